#!/bin/bash
# Train on SLURM: one task per device, DDP ranks from Lightning's SLURMEnvironment, preemption-safe.
#
#   sbatch [sbatch options] slurm/train.sh CONFIG [more lightning_app fit arguments]
#
# Runs `srun python -m lightning_app fit --config CONFIG --trainer.num_nodes N --trainer.devices T ...`,
# where N and T come from the allocation (--nodes, --ntasks-per-node), and the arguments after CONFIG
# are passed on. Nodes and devices are sbatch options: e.g. 2 nodes of 4 GPUs:
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train.sh CONFIG
# (--gpus-per-node is not in an #SBATCH line below because clusters without GPUs reject it).
# Partition, account, time and memory are sbatch options too (-p, -A, --time, --mem); none is set here.
# Submit from the repository root (relative paths in the config resolve against the submit directory).
#
# Preemption and time limits: SLURM sends SIGUSR1 300 s before the time limit (--signal); when the
# current training step ends, the CLI (lightning_app.preemption.RequeueOnSignal) saves hpc_ckpt_N.ckpt in
# the run directory and requeues the job (--requeue). Raise the lead time if a validation pass takes
# longer (sbatch --signal=SIGUSR1@900 ...): the signal is acted on after it. The run directory is
# trainer.default_root_dir/run_name (lightning_app/run_layout.py). A requeued start (SLURM_RESTART_COUNT > 0)
# resumes from the newest checkpoint in it (checkpoints/last*.ckpt, hpc_ckpt_*.ckpt); a first start never
# resumes, and checkpoints of an earlier run in that directory are an error: pass --ckpt_path PATH to continue
# that run, or a new --run_name. An explicit --ckpt_path is passed on unchanged.
# The log is appended to across restarts (--open-mode=append).
#
# Environment: PYTHON (default: python on PATH, the submitter's environment is exported to the job),
# OMP_NUM_THREADS (default: --cpus-per-task, else 1), MASTER_ADDR / MASTER_PORT (default: first node of
# the job, 15000 + the last 4 digits of the job id).
#SBATCH --job-name=grounded-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=SIGUSR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage() {
    echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG [lightning_app fit arguments]" >&2
    echo "       e.g. sbatch --nodes=1 --ntasks-per-node=2 slurm/train.sh configs/demo.yaml --trainer.max_steps 100" >&2
    exit 2
}
SCRIPT=slurm/train.sh
# sbatch runs a spooled copy of this script: find common.sh beside the original, else in the submit directory.
COMMON=$(dirname "$0")/common.sh
[[ -f $COMMON ]] || COMMON=${SLURM_SUBMIT_DIR:-$PWD}/slurm/common.sh
[[ -f $COMMON ]] || { echo "$SCRIPT: error: $COMMON not found: submit from the repository root" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$COMMON"
shift

# Resume only this job's own run (lightning_app/run_layout.py): a restarted job (SLURM_RESTART_COUNT > 0,
# after a requeue) continues from the newest checkpoint in its run directory; a first start with checkpoints
# of an earlier run in that directory stops with an error. An explicit --ckpt_path skips all of this.
RESUME=()
user_ckpt=0
for arg in "$@"; do
    [[ $arg == --ckpt_path || $arg == --ckpt_path=* ]] && user_ckpt=1
done
if ((user_ckpt == 0)); then
    ckpt=$("$PYTHON" -m lightning_app.run_layout resume --restart "${SLURM_RESTART_COUNT:-0}" -- --config "$CONFIG" "$@") ||
        die "not starting (see above)"
    if [[ -n $ckpt ]]; then
        echo "slurm/train.sh: resuming from checkpoint $ckpt"
        RESUME=(--ckpt_path "$ckpt")
    elif ((${SLURM_RESTART_COUNT:-0} > 0)); then
        echo "slurm/train.sh: restart ${SLURM_RESTART_COUNT} but no checkpoint in the run directory: training from the start" >&2
    fi
fi

echo "slurm/train.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$NODES node(s) x $TASKS_PER_NODE task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"
set -x
srun --kill-on-bad-exit=1 "$PYTHON" -m lightning_app fit --config "$CONFIG" \
    --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE" "$@" "${RESUME[@]}"
