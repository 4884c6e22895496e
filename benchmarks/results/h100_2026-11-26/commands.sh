#!/usr/bin/env bash
# What ran on one NVIDIA H100 80GB HBM3 (device call, 2026-11-26), after installing the wheels the image lacks
# (PYTHONPATH=/tmp/site:$PWD) and with the Mistral v1 tokenizer saved to a folder (no mistral-common there):
TOK=$PWD/.bench_data/tokenizer_mistral_v1
python3 -u benchmarks/dpo_bench.py --tokenizer $TOK --systems dpo_mixtral --steps 6 --warmup 2 \
  --prompt-tokens 1024 --answer-tokens 1024 --json $OUT/dpo_mixtral.json          # -> dpo_mixtral.*
python3 -u benchmarks/variants_bench.py --variants lora,dora,loraplus --json $OUT/variants.json model.tokenizer=$TOK
timeout 230 python3 -u benchmarks/variants_bench.py --variants pissa,olora,loftq --json $OUT/variants2.json \
  model.tokenizer=$TOK   # stopped by the timeout during loftq's initialisation -> variants2.* (pissa, olora)
