#!/usr/bin/env bash
# Issue 10's peers in ONE call on one GPU, then (time allowing) where the 6 GiB config's peak goes.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt; lscpu | grep 'Model name' > $OUT/cpu.txt
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site .whl_gpu/*.whl && pip /tmp/unsloth_site .whl_unsloth/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD UNSLOTH_SITE=/tmp/unsloth_site TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
LEAN="fine_tune_nf4@trainer.checkpointing.offload=true+lora.lora_dropout=0"
echo "setup done at $((SECONDS - T0)) s"
timeout ${SPEED_S:-470} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/speed.json \
  --systems "${SYSTEMS:-fine_tune_nf4,unsloth,trl_liger,trl,fine_tune_bf16,$LEAN,plain}" > $OUT/speed.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -v "^{" $OUT/speed.log | grep -E '^[a-z_@.=+0-9]+: |^\|' | cut -c1-400
LEFT=$((575 - (SECONDS - T0)))
if [ $LEFT -gt 70 ]; then
  PROFILE_MEMORY=1 timeout $LEFT python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
    --steps 5 --warmup 3 --profile $OUT/mem --systems "$LEAN" > $OUT/mem.log 2>&1
  echo "memory exit $? at $((SECONDS - T0)) s"; cat $OUT/mem/*_memory.txt 2>/dev/null | head -30
fi
