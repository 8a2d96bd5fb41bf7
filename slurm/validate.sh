#!/bin/bash
# Validate on SLURM: one task per device, ranks from Lightning's SLURMEnvironment.
#
#   sbatch [sbatch options] slurm/validate.sh CONFIG --ckpt_path PATH [more lightning_app validate arguments]
#
# Runs `srun python -m lightning_app validate --config CONFIG --trainer.num_nodes N --trainer.devices T ...`
# with N and T from the allocation (--nodes, --ntasks-per-node); the report is written to the run directory
# as after `fit`. GPUs, partition, account, time: sbatch options, as for slurm/train.sh (see slurm/README.md).
# A requeued validation job starts over (validation keeps no state worth resuming).
#
# Environment: PYTHON (default: python on PATH), OMP_NUM_THREADS (default: --cpus-per-task, else 1),
# MASTER_ADDR / MASTER_PORT (default: first node of the job, 15000 + the last 4 digits of the job id).
#SBATCH --job-name=grounded-validate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage() {
    echo "usage: sbatch [sbatch options] slurm/validate.sh CONFIG [lightning_app validate arguments, e.g. --ckpt_path PATH]" >&2
    exit 2
}
die() {
    echo "slurm/validate.sh: error: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
[[ $1 != -h && $1 != --help ]] || usage
CONFIG=$1
shift
[[ $CONFIG != -* ]] || die "the first argument must be the config file, got option '$CONFIG'"
[[ -f $CONFIG ]] || die "config file '$CONFIG' not found (cwd: $PWD)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit with sbatch (or run it inside salloc)"
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found on PATH (activate the environment before sbatch, or set PYTHON)"

NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
    TASKS_PER_NODE=$SLURM_NTASKS_PER_NODE
else
    NTASKS=${SLURM_NTASKS:-1}
    ((NTASKS % NODES == 0)) || die "$NTASKS tasks do not divide evenly over $NODES nodes; use --ntasks-per-node"
    TASKS_PER_NODE=$((NTASKS / NODES))
fi
[[ $TASKS_PER_NODE =~ ^[0-9]+$ ]] || die "cannot use SLURM_NTASKS_PER_NODE='$TASKS_PER_NODE'; pass --ntasks-per-node=N"

MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS
# Slurm >= 22.05: srun does not inherit --cpus-per-task from the batch allocation by itself.
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

echo "slurm/validate.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$NODES node(s) x $TASKS_PER_NODE task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"
set -x
srun --kill-on-bad-exit=1 "$PYTHON" -m lightning_app validate --config "$CONFIG" \
    --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE" "$@"
