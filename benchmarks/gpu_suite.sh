#!/usr/bin/env bash
# The suite's GPU figures in one run, on one GPU, in under 8 minutes:
#   env       CUDA and bf16 (stops the run without them), versions, the GPU's dense bf16 peak, free disk
#   overhead  benchmarks/overhead.py --preset 7b: grounded (4 of 32 layers) vs plain, random bf16 weights;
#             fwd+bwd, prefill and per-token decode ratios
#   zero      benchmarks/zero_throughput.py, one process per strategy (DDP, ZeRO-2, ZeRO-3) on one device:
#             tokens/s, peak memory, MFU by the LoRA-step and the 6N FLOP conventions
#   fit       configs/llava7b.yaml's recipe through Lightning with configs/strategies/zero2.yaml, then zero3.yaml,
#             on a 4-layer 7B-wide substitute (random weights written locally, loaded by from_pretrained) and a
#             small synthetic world: 20 steps, then validate from the run's last.ckpt
#   decoding  benchmarks/decoding_speed.py --models cpu --device cuda: every decoding method's captions/s at
#             batch 1 and 32, grounded included
#   decoding7b  (opt-in, not in the default parts: --only decoding7b, about 3 minutes) the same table for the
#             7B-shaped preset (llava-1.5-7b's language model, 576 image tokens, bf16, random weights)
#
#   bash benchmarks/gpu_suite.sh [--smoke] [--only overhead,zero,fit,decoding,decoding7b]
#
# Writes $OUT/gpu_suite.json (one entry per step: status, seconds, commands, figures), gpu_suite.md (the figures
# beside the targets) and gpu_suite.log (every command's log); OUT defaults to ./gpu_suite_out. Exits non-zero
# naming every failed step; a failed step does not stop the others (a validate needs its fit). Each step has
# its own timeout, and the run a budget (GPU_SUITE_BUDGET_S, default 480 s): a step that would start past it
# is skipped, which fails the run. --only reruns some parts (env always runs).
# --smoke: every step at tiny sizes on the CPU (the test suite runs it; the fit part beside the others): the
# DeepSpeed commands run up to Lightning's refusal of the CPU, which must be that refusal; the zero2 fit and
# validate then run again with the plain strategy.
# Environment: OUT, PYTHON (default python3), GPU_SUITE_BUDGET_S, GPU_PEAK_TFLOPS (for a GPU the table in
# benchmarks/gpu_suite.py lacks), GPU_SUITE_KEEP=1 (keep the work directory, printed at the start).
set -euo pipefail

SMOKE=0
PARTS=overhead,zero,fit,decoding
INVOCATION="bash benchmarks/gpu_suite.sh $*"
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --only) PARTS=${2:?--only needs a comma-separated list of parts}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (--smoke, --only PARTS, --help)" >&2; exit 2 ;;
    esac
    shift
done
for part in ${PARTS//,/ }; do
    [[ $part =~ ^(overhead|zero|fit|decoding|decoding7b)$ ]] ||
        { echo "gpu_suite.sh: unknown part '$part' in --only" >&2; exit 2; }
done
selected() { [[ ,$PARTS, == *,$1,* ]]; }

OUT=${OUT:-gpu_suite_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
[[ ${GPU_SUITE_KEEP:-0} == 1 ]] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ((SMOKE)); then
    MODE=smoke BUDGET=${GPU_SUITE_BUDGET_S:-900}
    T_ENV=120 T_OVERHEAD=300 T_ZERO=300 T_SUB=300 T_FIT=300 T_VALIDATE=300 T_DECODING=300 T_DECODING7B=300
    OVERHEAD_ARGS=(--preset tiny --reps 1)
    ZERO_ARGS=(--shape tiny --accelerator cpu --batch-size 2 --steps 2 --warmup 1)
    SHAPE=tiny WORLD_SIZES='"num_train": 16, "num_val": 4'
    FIT_ARGS=(--trainer.accelerator cpu --trainer.precision 32-true --model.init_args.dtype float32
              --trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.log_every_n_steps 1
              --data.init_args.batch_size 4
              --data.init_args.val_batch_size 4 --data.init_args.max_val_images 4 --data.init_args.max_val_questions 4
              --data.init_args.num_workers 0 --model.init_args.generation.caption_max_new_tokens 4)
    DECODING_ARGS=(--smoke)
    DECODING7B_ARGS=(--smoke)  # the 7B shape needs CUDA: on the CPU the step runs the tiny model's table
else
    MODE=gpu BUDGET=${GPU_SUITE_BUDGET_S:-480}
    T_ENV=90 T_OVERHEAD=150 T_ZERO=150 T_SUB=90 T_FIT=150 T_VALIDATE=100 T_DECODING=120 T_DECODING7B=300
    OVERHEAD_ARGS=(--preset 7b --reps 6)
    # the recipe's micro-batch (16 per GPU) and docs/scale.md's 620-token rows (576 image + 44 text)
    ZERO_ARGS=(--shape 7b --batch-size 16 --text 44 --steps 6 --warmup 2)
    SHAPE=7b WORLD_SIZES='"num_train": 128, "num_val": 8'  # 384 caption rows: 24 batches of 16
    FIT_ARGS=(--trainer.devices 1 --trainer.max_steps 20 --trainer.val_check_interval 20 --trainer.log_every_n_steps 5
              --data.init_args.batch_size 16 --data.init_args.val_batch_size 8 --data.init_args.max_val_images 8
              --data.init_args.max_val_questions 8 --data.init_args.num_workers 0
              --model.init_args.generation.caption_max_new_tokens 32)
    DECODING_ARGS=(--models cpu --device cuda --batches 1,32 --reps 2 --new-tokens 16)
    DECODING7B_ARGS=(--models 7b --device cuda --batches 1,32 --reps 2 --new-tokens 16)
fi
WORLD="{\"root\": \"$WORK/world\", $WORLD_SIZES}"
# the llava7b recipe as the CLI tests override it for a local substitute and a synthetic world
FIT_ARGS+=(--model.init_args.backbone "$WORK/substitute" --model.init_args.grounding.layers "[-2, -1]"
           --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/runs"
           --data.init_args.world "$WORLD" --data.init_args.coco_dir "$WORK/world" --data.init_args.image_dir null
           --data.init_args.train_split train --data.init_args.val_split val --data.init_args.val_image_ids null
           --data.init_args.val_question_files null --data.init_args.cache_dir "$WORK/cache")
MIN_STEP_S=20  # a step with less time left than this is skipped
DEADLINE=$((BUDGET - 30))  # the summary's time is kept

record() {  # record STEP KIND RC SECONDS LIMIT [--reason TEXT] -- COMMAND...
    "$PYTHON" benchmarks/gpu_suite.py record "$WORK" "$@"
}

run_step() {  # run_step STEP KIND LIMIT COMMAND...: run it under its timeout, log, record; 0 if it passed
    local step=$1 kind=$2 limit=$3 rc=0 start end
    shift 3
    local left=$((DEADLINE - SECONDS))
    if ((left < MIN_STEP_S)); then
        record "$step" skipped -1 0 "$limit" --reason "the run's ${BUDGET} s budget is spent" -- "$@"
        return 1
    fi
    ((limit <= left)) || limit=$left
    echo "[gpu_suite] $step ($kind, limit ${limit} s): $*"
    start=${EPOCHREALTIME//[!0-9]/}
    timeout --kill-after=15 "$limit" "$@" >"$WORK/logs/$step.$kind.log" 2>&1 || rc=$?
    end=${EPOCHREALTIME//[!0-9]/}
    record "$step" "$kind" "$rc" "$(((end - start) / 1000000)).$(printf '%06d' $(((end - start) % 1000000)))" "$limit" \
        -- "$@"
}

skip() {  # skip STEP REASON
    record "$1" skipped -1 0 0 --reason "$2" --
}

summary() {
    local rc=0
    "$PYTHON" benchmarks/gpu_suite.py summary "$WORK" "$OUT" --mode "$MODE" --seconds "$SECONDS" \
        --budget "$BUDGET" --parts "$PARTS" --invocation "$INVOCATION" || rc=$?
    [[ -f $OUT/gpu_suite.md ]] && cat "$OUT/gpu_suite.md"
    return "$rc"
}

echo "[gpu_suite] $MODE mode, parts $PARTS, budget ${BUDGET} s; work directory $WORK; summary in $OUT"
if ! run_step env run "$T_ENV" "$PYTHON" benchmarks/gpu_suite.py env "$WORK" $( ((SMOKE)) && echo --smoke); then
    [[ ! -f $WORK/logs/env.run.log ]] || cat "$WORK/logs/env.run.log" >&2
    summary || true
    echo "[gpu_suite] FAILED: env (see above); nothing else was run" >&2
    exit 1
fi
PEAK=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["peak_tflops"] or 989)' "$WORK/env.json")

part_overhead() {
    run_step overhead run "$T_OVERHEAD" "$PYTHON" benchmarks/overhead.py "${OVERHEAD_ARGS[@]}" \
        --json "$WORK/overhead.json" || true
}

part_zero() {
    local strategy kind
    for strategy in ddp zero2 zero3; do
        kind=run
        [[ $SMOKE == 1 && $strategy != ddp ]] && kind=refusal
        run_step "zero_$strategy" "$kind" "$T_ZERO" "$PYTHON" benchmarks/zero_throughput.py --strategies "$strategy" \
            "${ZERO_ARGS[@]}" --peak-tflops "$PEAK" --backbone "$WORK/zero_backbone" \
            --json "$WORK/zero_$strategy.json" || true
    done
    rm -rf "$WORK/zero_backbone"  # 13 GiB at 7B shape
}

fit_strategy() {  # fit_strategy STRATEGY: fit, then validate from its checkpoint
    local strategy=$1 cli fit validate
    cli=(--config configs/llava7b.yaml --config "configs/strategies/$strategy.yaml" "${FIT_ARGS[@]}"
         --run_name "$strategy")
    fit=("$PYTHON" -m lightning_app fit "${cli[@]}")
    validate=("$PYTHON" -m lightning_app validate "${cli[@]}" --ckpt_path "$WORK/runs/$strategy/checkpoints/last.ckpt")
    if ((SMOKE)); then  # up to DeepSpeed's refusal; zero2's then again with the plain strategy
        run_step "fit_$strategy" refusal "$T_FIT" "${fit[@]}" || true
        if [[ $strategy == zero3 ]]; then
            run_step "validate_$strategy" refusal "$T_VALIDATE" "${validate[@]}" || true
        elif run_step "fit_$strategy" substitute "$T_FIT" "${fit[@]}" --trainer.strategy auto; then
            run_step "validate_$strategy" substitute "$T_VALIDATE" "${validate[@]}" --trainer.strategy auto || true
        else
            skip "validate_$strategy" "fit_$strategy failed: no checkpoint to validate"
        fi
    elif run_step "fit_$strategy" run "$T_FIT" "${fit[@]}"; then
        run_step "validate_$strategy" run "$T_VALIDATE" "${validate[@]}" || true
    else
        skip "validate_$strategy" "fit_$strategy failed: no checkpoint to validate"
    fi
}

part_fit() {
    local step
    if run_step substitute run "$T_SUB" "$PYTHON" benchmarks/gpu_suite.py substitute "$WORK" --world "$WORLD" \
        --shape "$SHAPE"; then
        fit_strategy zero2
        fit_strategy zero3
    else
        for step in fit_zero2 validate_zero2 fit_zero3 validate_zero3; do
            skip "$step" "the substitute was not written"
        done
    fi
}

part_decoding() {
    run_step decoding run "$T_DECODING" "$PYTHON" benchmarks/decoding_speed.py "${DECODING_ARGS[@]}" \
        --json "$WORK/decoding.json" || true
}

part_decoding7b() {
    run_step decoding7b run "$T_DECODING7B" "$PYTHON" benchmarks/decoding_speed.py "${DECODING7B_ARGS[@]}" \
        --json "$WORK/decoding7b.json" || true
}

fit_pid=
if ((SMOKE)) && selected fit; then  # CPU: the fit part beside the others (two processes at a time)
    part_fit &
    fit_pid=$!
fi
! selected overhead || part_overhead
! selected zero || part_zero
[[ -n $fit_pid ]] || ! selected fit || part_fit
! selected decoding || part_decoding
! selected decoding7b || part_decoding7b
[[ -z $fit_pid ]] || wait "$fit_pid" || true

summary
