#!/usr/bin/env bash
# Samples speed per cache strategy (Mistral-7B nf4), then an unsloth env smoke run.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt; python3 -m pip list > $OUT/image_pip_list.txt 2>/dev/null
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site .whl_gpu/*.whl && pip /tmp/unsloth_site .whl_unsloth/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
echo "setup done at $((SECONDS - T0)) s"
timeout ${GEN_S:-300} python3 -u benchmarks/generate_bench.py model=mistral_7b model.init=random model.tokenizer=$TOK quant=nf4 \
  dataset.template=mistral --caches ${CACHES:-dynamic,static} --prompts 4 --new-tokens 32 --repeats 4 --json $OUT/gen.json > $OUT/gen.log 2>&1
echo "gen exit $? at $((SECONDS - T0)) s"; grep -v -i warn $OUT/gen.log | tail -25
if [ -n "${UNSLOTH:-}" ]; then
  ( export PYTHONPATH=/tmp/unsloth_site:/tmp/site:$PWD UNSLOTH_DISABLE_STATISTICS=1
    timeout 60 python3 -c "import unsloth, transformers, trl; print('unsloth', unsloth.__version__, transformers.__version__, trl.__version__)" > $OUT/unsloth_import.log 2>&1
    echo "unsloth import exit $?"; tail -5 $OUT/unsloth_import.log )
  export UNSLOTH_SITE=/tmp/unsloth_site
  timeout ${SPEED_S:-240} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
    --steps 8 --warmup 3 --json $OUT/speed.json --systems "${SYSTEMS:-unsloth}" > $OUT/speed.log 2>&1
  echo "speed exit $? at $((SECONDS - T0)) s"; grep -v "^{" $OUT/speed.log | tail -15
fi
