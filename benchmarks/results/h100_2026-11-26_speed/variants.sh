#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
TOK=$PWD/.bench_data/tokenizer_mistral_v1
timeout ${VS:-560} python3 -u benchmarks/variants_bench.py --variants ${VARIANTS:-lora,lora_bf16,olora,pissa_niter_4,dora} --json $OUT/variants.json model.tokenizer=$TOK > $OUT/variants.log 2>&1
echo "exit $?"; grep -v -i warn $OUT/variants.log | tail -25
