#!/usr/bin/env bash
# fine_tune nf4 speed (also writes the random checkpoint), then samples per decode strategy on that
# checkpoint loaded with from_pretrained (the path real checkpoints take).
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
echo "setup done at $((SECONDS - T0)) s"
timeout ${SPEED_S:-200} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/speed.json --systems "${SYSTEMS:-fine_tune_nf4}" > $OUT/speed.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -v "^{" $OUT/speed.log | tail -6
timeout ${GEN_S:-330} python3 -u benchmarks/generate_bench.py model=local model.name_or_path=/tmp/speed_work/model quant=nf4 \
  dataset.template=mistral --decode ${DECODE:-dynamic,graphs,compiled} --prompts 4 --new-tokens 32 --repeats 4 --json $OUT/gen.json > $OUT/gen.log 2>&1
echo "gen exit $? at $((SECONDS - T0)) s"; grep -E '^(dynamic|static|graphs|compiled) |Error|error' $OUT/gen.log | tail -12
