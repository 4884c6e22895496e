#!/usr/bin/env bash
# Profile fine_tune against TRL (+Liger) on the same work, one GPU.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
echo "setup done at $((SECONDS - T0)) s"
timeout ${SPEED_S:-540} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps ${STEPS:-8} --warmup 4 --json $OUT/speed.json $([ -z "${NOPROF:-}" ] && echo --profile $OUT/prof) --systems "${SYSTEMS}" 2>&1 | tee $OUT/speed.log | grep -v "^{" | tail -40
echo "exit at $((SECONDS - T0)) s"
