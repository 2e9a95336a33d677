#!/usr/bin/env bash
# GPU checks on one CUDA device, each bounded in time and run even if an earlier one failed
# (about 6 minutes on one H100/H200):
#   1. the device and torch;
#   2. loom's attention kernel interface against an fp64 CPU reference: output, log-sum-exp and
#      the three gradients, causal, bidirectional and packed documents, bf16 and fp32;
#   3. the MoE experts' grouped GEMMs against a loop, at Mixtral 8x7B's expert shape, bf16;
#   4. one short training run in every dtype (fp32, bf16, FP8 tensorwise and rowwise) of Llama 3
#      8B's shape cut to 2 layers, seq 8192, and one of LoRA on packed fine-tuning examples;
#   5. bf16 and FP8 (tensorwise) throughput of Llama 3 8B's shape cut to 8 layers at seq 8192:
#      median tokens/s, model TFLOP/s and MFU of steps 3 onward, peak memory, and the planner's
#      predicted memory for the same layout beside it; Mixtral 8x7B cut to 2 layers in bf16;
#   6. a table of every check, then the figures of the training runs that passed.
# Usage: scripts/gpu_check.sh [--cpu] [OUTPUT_DIR]   (python3 must have torch, with CUDA unless
# --cpu, and torchao for the FP8 runs; loom runs from this checkout, nothing is installed).
# --cpu: the same checks on the CPU at toy sizes (a smoke test of this script, run by the suite).
# Exit status: the number of checks that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu
  shift
fi
OUT_DIR=${1:-${OUT:-/tmp/loom-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0
: >"$OUT_DIR/table.txt"

if [ "$DEVICE" = cuda ]; then  # sizes: the checks' real ones, or toy ones on the CPU
  SEQ=8192 ATTN_ARGS="--length 2048 --head-dim 128" SHORT=(--model.name=llama3-8b --model.n_layers=2)
  LLAMA=(--model.name=llama3-8b --model.n_layers=8) MIXTRAL=(--model.name=mixtral-8x7b --model.n_layers=2)
  GEMM_ARGS="--dim 4096 --ffn 14336 --tokens 16384" STEPS=12 SCALE=1
else
  SEQ=128 ATTN_ARGS="--length 128 --head-dim 32" SHORT=(--model.dim=64 --model.n_layers=2 --model.n_heads=4
    --model.n_kv_heads=2 --model.ffn_dim=128) LLAMA=("${SHORT[@]}")
  MIXTRAL=(--model.name=tiny-moe --model.n_layers=2) GEMM_ARGS="--dim 64 --ffn 128 --tokens 256" STEPS=4 SCALE=3
fi

check() {  # check NAME SECONDS COMMAND...: its log's tail, and a row of the table
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local status=$?
  if [ "$status" -eq 0 ]; then
    tail -n 12 "$OUT_DIR/$name.log"
    echo "--- $name: ok in $((SECONDS - start)) s"
    printf '%-24s ok      %4d s\n' "$name" $((SECONDS - start)) >>"$OUT_DIR/table.txt"
  else
    tail -n 25 "$OUT_DIR/$name.log"
    echo "--- $name: FAILED (status $status) after $((SECONDS - start)) s"
    printf '%-24s FAILED  %4d s  (status %d, log %s)\n' "$name" $((SECONDS - start)) "$status" \
      "$OUT_DIR/$name.log" >>"$OUT_DIR/table.txt"
    failed=$((failed + 1))
  fi
  return "$status"
}

RUNS=()  # the train_checks that passed: their figures join the table at the end, in one process
train_check() {  # train_check NAME SECONDS ARGS...: a one-device run, its overrides kept beside its metrics
  local name=$1 limit=$2
  shift 2
  local args=(--train.device="$DEVICE" --parallel.dp_shard=1 --parallel.pp=1 --train.eval_every=0
    --metrics.log_every=1 --metrics.plot= --metrics.jsonl="$OUT_DIR/$name.jsonl" --train.seq_len="$SEQ"
    --train.micro_batch=1 "$@")
  printf '%s\n' "${args[@]}" >"$OUT_DIR/$name.args"
  check "$name" "$limit" $PY -m loom train --quiet "${args[@]}" && RUNS+=("$OUT_DIR/$name.jsonl")
}

if [ "$DEVICE" = cuda ]; then
  check device 30 $PY -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
else
  check device 30 $PY -c "import os, torch; print('torch', torch.__version__, 'CPU,', os.cpu_count(), 'cores')"
fi
check attention 60 $PY benchmarks/attention_check.py --device "$DEVICE" $ATTN_ARGS
check grouped_gemm 90 $PY benchmarks/grouped_gemm.py --device "$DEVICE" --dtype bfloat16 --experts 8 $GEMM_ARGS
for dtype in float32 bfloat16 fp8_tensorwise fp8_rowwise; do
  case $dtype in
    fp8_*) args=(--train.dtype=bfloat16 --train.fp8="${dtype#fp8_}") ;;
    *) args=(--train.dtype="$dtype") ;;
  esac
  train_check "step_$dtype" 90 "${SHORT[@]}" "${args[@]}" --train.global_batch=1 --train.steps=2 \
    --train.recompute=full
done
# Fine-tuning: LoRA (bf16 base) on packed examples of the builtin instruction set.
check step_lora_sft 120 $PY -m loom train --quiet --train.device="$DEVICE" --parallel.dp_shard=1 --parallel.pp=1 \
  "${SHORT[@]}" --train.dtype=bfloat16 --lora.rank=16 --lora.base_dtype=bfloat16 --data.format=sft \
  --data.path=builtin:python-stdlib-sft --train.seq_len="$SEQ" --train.micro_batch=1 --train.global_batch=1 \
  --train.steps=2 --train.eval_every=0 --metrics.plot= --metrics.jsonl="$OUT_DIR/step_lora_sft.jsonl"
train_check llama3_8b_8_layers_bf16 200 "${LLAMA[@]}" --train.dtype=bfloat16 --train.global_batch=4 \
  --train.steps="$STEPS" --train.recompute=selective
train_check llama3_8b_8_layers_fp8 200 "${LLAMA[@]}" --train.dtype=bfloat16 --train.fp8=tensorwise \
  --train.global_batch=4 --train.steps="$STEPS" --train.recompute=selective
train_check mixtral_8x7b_2_layers 160 "${MIXTRAL[@]}" --train.dtype=bfloat16 --train.global_batch=4 \
  --train.steps="$STEPS"
if [ "${#RUNS[@]}" -gt 0 ]; then
  echo "=== figures"
  $PY scripts/gpu_check_figures.py "${RUNS[@]}" | tee -a "$OUT_DIR/table.txt"
fi
echo "=== summary ($DEVICE)"
cat "$OUT_DIR/table.txt"
echo "=== $failed check(s) failed; logs in $OUT_DIR"
exit "$failed"
