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
# trainer.default_root_dir and requeues the job (--requeue). Raise the lead time if a validation pass takes
# longer (sbatch --signal=SIGUSR1@900 ...): the signal is acted on after it. On every start (first or requeued) without a --ckpt_path argument, this script
# looks for the newest checkpoint of the run (last*.ckpt of its ModelCheckpoint callbacks,
# hpc_ckpt_*.ckpt in default_root_dir) and passes it as --ckpt_path; `--ckpt_path null` starts fresh.
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

# Resume: the newest checkpoint of this run, unless the arguments choose one.
RESUME=()
user_ckpt=0
for arg in "$@"; do
    [[ $arg == --ckpt_path || $arg == --ckpt_path=* ]] && user_ckpt=1
done
if ((user_ckpt == 0)); then
    # Resolve the run's directories with the CLI itself (--print_config: parses, instantiates nothing).
    ckpt=$("$PYTHON" - "$CONFIG" "$@" <<'PY'
import os, re, subprocess, sys
from pathlib import Path

import yaml

out = subprocess.run([sys.executable, "-m", "lightning_app", "fit", "--config", *sys.argv[1:], "--print_config"],
                     capture_output=True, text=True)
if out.returncode != 0:
    sys.exit(f"cannot resolve the config for resuming (--print_config failed):\n{out.stderr[-3000:]}")
trainer = yaml.safe_load(out.stdout).get("trainer") or {}
root = Path(trainer.get("default_root_dir") or os.getcwd())
callbacks = trainer.get("callbacks") or []
callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
loggers = trainer.get("logger")
loggers = loggers if isinstance(loggers, list) else [loggers]
dirs = [Path(cb["init_args"]["dirpath"]) for cb in callbacks
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint")
        and (cb.get("init_args") or {}).get("dirpath")]
if not dirs:  # ModelCheckpoint without dirpath: {save_dir}/{name}/version_*/checkpoints of the first logger
    first = loggers[0] if isinstance(loggers[0], dict) else {}
    args = first.get("init_args") or {}
    base = Path(args.get("save_dir") or root) / str(args.get("name") or "lightning_logs")
    dirs = sorted(base.glob("version_*/checkpoints"))
found = [p for d in dirs if d.is_dir() for p in d.iterdir() if re.fullmatch(r"last(-\d+)?\.ckpt", p.name)]
found += [p for p in root.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)]
if found:
    print(max(found, key=lambda p: p.stat().st_mtime))
PY
    ) || die "could not look for a checkpoint to resume from (see above); pass --ckpt_path to skip the search"
    if [[ -n $ckpt ]]; then
        echo "slurm/train.sh: resuming from checkpoint $ckpt"
        RESUME=(--ckpt_path "$ckpt")
    elif ((${SLURM_RESTART_COUNT:-0} > 0)); then
        echo "slurm/train.sh: restart ${SLURM_RESTART_COUNT} but no checkpoint found: training from the start" >&2
    fi
fi

echo "slurm/train.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$NODES node(s) x $TASKS_PER_NODE task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"
set -x
srun --kill-on-bad-exit=1 "$PYTHON" -m lightning_app fit --config "$CONFIG" \
    --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE" "$@" "${RESUME[@]}"
