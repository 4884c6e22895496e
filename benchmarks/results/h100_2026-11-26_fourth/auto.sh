#!/usr/bin/env bash
# (.gpu/mixtral.sh below is benchmarks/results/h100_2026-11-26_speed/mixtral.sh)
# every_n_layers=auto (the new default) on nf4 and bf16 Mistral-7B and Mixtral-8x7B: what it picks, speed, peak.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
rm -rf /tmp/speed_work
timeout 250 python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/speed.json --systems "fine_tune_nf4,fine_tune_bf16" > $OUT/speed.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -E '^\|' $OUT/speed.log
grep -h "checkpointing " /tmp/speed_work/*/*.log 2>/dev/null | head; grep -rh "checkpointing one\|checkpointing every" /tmp/speed_work 2>/dev/null | head -4
rm -rf /tmp/mix_run; mkdir -p $OUT/mix; OUT=$OUT/mix MIX_S=200 bash .gpu/mixtral.sh | grep -E "steady|peak_memory|exit|checkpointing|plan"
grep -h "checkpointing" $OUT/mix/mixtral.log | head -3
