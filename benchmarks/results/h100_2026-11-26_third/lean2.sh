#!/usr/bin/env bash
# fine_tune nf4 lean (offload + dropout 0) and default, after the deferred sdpa mask.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
timeout 200 python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/speed.json \
  --systems "fine_tune_nf4@trainer.checkpointing.offload=true+lora.lora_dropout=0,fine_tune_nf4" > $OUT/speed.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -E '^\||Error' $OUT/speed.log
