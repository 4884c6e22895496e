#!/usr/bin/env bash
# Mixtral-8x7B shape through the real CLI, nf4 experts, LoRA attention + experts, packed 4 x 2048.
set -u
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
STEPS=${STEPS:-14}
timeout ${MIX_S:-560} python3 -m fine_tune model=mixtral_8x7b model.init=random model.tokenizer=$TOK quant=nf4 lora=attn_experts \
  trainer=gpu trainer.max_steps=$STEPS trainer.per_device_train_batch_size=4 trainer.gradient_accumulation_steps=1 \
  dataset=shared_alpaca "dataset.path=[/tmp/data/gsm8k_train.alpaca.json,/tmp/data/gpteacher_roleplay.alpaca.json]" \
  dataset.max_length=2048 dataset.packing=true dataset.max_samples=2000 trainer.logging_steps=1 trainer.eval_steps=1000 trainer.save_steps=1000 \
  logger=none optim=paged_adamw_8bit ${EXTRA:-} hydra.run.dir=/tmp/mix_run > $OUT/mixtral.log 2>&1
echo "exit $? at $((SECONDS - T0)) s"
grep -v -i warn $OUT/mixtral.log | grep -E "step |final|plan|Error|error" | tail -30
cp /tmp/mix_run/metrics.json /tmp/mix_run/metrics.jsonl $OUT/ 2>/dev/null
python3 - <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from speed import steady_from_log
rows = [json.loads(x) for x in open("/tmp/mix_run/metrics.jsonl")]
steps = [r for r in rows if "perf/tokens_per_second" in r]
print("steady tok/s (steps 5..):", steady_from_log(steps, 4, 10**9))
m = json.load(open("/tmp/mix_run/metrics.json")); print({k: m.get(k) for k in ("peak_memory_gib", "tokens_per_second", "mfu", "train_time_s", "sample_time_s")})
PY
