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
SCRIPT=slurm/validate.sh
# sbatch runs a spooled copy of this script: find common.sh beside the original, else in the submit directory.
COMMON=$(dirname "$0")/common.sh
[[ -f $COMMON ]] || COMMON=${SLURM_SUBMIT_DIR:-$PWD}/slurm/common.sh
[[ -f $COMMON ]] || { echo "$SCRIPT: error: $COMMON not found: submit from the repository root" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$COMMON"
shift

echo "slurm/validate.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$NODES node(s) x $TASKS_PER_NODE task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"
set -x
srun --kill-on-bad-exit=1 "$PYTHON" -m lightning_app validate --config "$CONFIG" \
    --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE" "$@"
