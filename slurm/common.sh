# Shared by slurm/train.sh and slurm/validate.sh (sourced, not run): checks the CONFIG argument, reads nodes and
# tasks per node from the allocation, exports MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS. The sourcing script
# sets SCRIPT (its name, for messages) and defines usage(); afterwards CONFIG, PYTHON, NODES, TASKS_PER_NODE
# are set and "$@" holds the remaining arguments (the caller shifts CONFIG off).
die() {
    echo "$SCRIPT: error: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
[[ $1 != -h && $1 != --help ]] || usage
CONFIG=$1
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

