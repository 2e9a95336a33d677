#!/usr/bin/env bash
# GPU checks on one CUDA device, each bounded in time and run even if an earlier one failed:
#   1. the device and torch;
#   2. the MoE experts' grouped GEMMs against a loop, at Mixtral 8x7B's expert shape, bf16;
#   3. single-GPU bf16 training runs of loom on the embedded corpus (Llama 3 8B's shape cut to 8
#      layers, seq 8192; Mixtral 8x7B's cut to 2 layers, seq 4096): median tokens/s per device,
#      model TFLOP/s and MFU of steps 3 onward, and peak memory, from the metrics JSONL.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]   (python3 must have torch with CUDA; loom runs from
# this checkout, nothing is installed). Exit status: the number of checks that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-/tmp/loom-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

check() {  # check NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local status=$?
  if [ "$status" -eq 0 ]; then
    tail -n 12 "$OUT_DIR/$name.log"
    echo "--- $name: ok in $((SECONDS - start)) s"
  else
    tail -n 25 "$OUT_DIR/$name.log"
    echo "--- $name: FAILED (status $status) after $((SECONDS - start)) s"
    failed=$((failed + 1))
  fi
  return "$status"
}

summary() {  # summary JSONL: the figures of steps 3 onward
  $PY - "$1" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
late = [r for r in rows if r["step"] >= 3] or rows
med = lambda k: statistics.median(r[k] for r in late if r.get(k) is not None)
print(f"steps {rows[0]['step']}-{rows[-1]['step']}, {rows[0].get('flops_convention')}: tokens/s per device "
      f"{med('tokens_per_s_per_device'):,.0f}, model TFLOP/s per device {med('tflops_per_device'):.1f}, "
      f"MFU {100 * med('mfu'):.1f}%, peak memory {max(r['peak_memory_bytes'] for r in rows) / 2**30:.1f} GiB, "
      f"final loss {rows[-1]['loss']:.3f}")
PYEOF
}

train_check() {  # train_check NAME SECONDS ARGS...: a single-GPU bf16 run, then its figures
  local name=$1 limit=$2
  shift 2
  check "$name" "$limit" $PY -m loom train --quiet --train.device=cuda --train.dtype=bfloat16 \
    --parallel.dp_shard=1 --parallel.pp=1 --train.eval_every=0 --metrics.log_every=1 --metrics.plot= \
    --metrics.jsonl="$OUT_DIR/$name.jsonl" "$@" && summary "$OUT_DIR/$name.jsonl"
}

check device 30 $PY -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
check grouped_gemm 90 $PY benchmarks/grouped_gemm.py --device cuda --dtype bfloat16 --experts 8 --dim 4096 \
  --ffn 14336 --tokens 16384
train_check llama3_8b_8_layers 200 --model.name=llama3-8b --model.n_layers=8 --train.seq_len=8192 \
  --train.micro_batch=1 --train.global_batch=4 --train.steps=12 --train.recompute=selective
train_check mixtral_8x7b_2_layers 160 --model.name=mixtral-8x7b --model.n_layers=2 --train.seq_len=4096 \
  --train.micro_batch=1 --train.global_batch=4 --train.steps=10
echo "=== $failed check(s) failed; logs in $OUT_DIR"
exit "$failed"
