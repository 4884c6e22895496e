#!/usr/bin/env bash
# The run lifecycle on one GPU, through the real CLI: bf16 training with eval samples and checkpoints,
# SIGTERM mid-run + resume=true compared with the uninterrupted run, a QLoRA (nf4) run, generate,
# export (adapter and merged, loaded back with plain transformers on the GPU), and validate=true on a
# Mistral-7B-shaped config. On the device machine, wheels from .whl/ (carry it) are installed first.
#   OUT=/tmp/lc_out bash benchmarks/lifecycle_gpu_smoke.sh
set -o pipefail
OUT=${OUT:-/tmp/lc_out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import hydra, mistral_common" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FINE_TUNE_CACHE=${FINE_TUNE_CACHE:-/tmp/ftcache} TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
T="logger=none trainer.max_steps=120 trainer.per_device_train_batch_size=4 dataset.max_length=256 trainer.logging_steps=1
   trainer.eval_steps=40 trainer.save_steps=30 dataset.max_samples=64 dataset.max_eval_samples=8"
rm -rf /tmp/lc_a /tmp/lc_b /tmp/lc_q
$PY -m fine_tune $T hydra.run.dir=/tmp/lc_a > "$OUT/uninterrupted.log" 2>&1; echo "uninterrupted rc=$?"
$PY -m fine_tune $T hydra.run.dir=/tmp/lc_b > "$OUT/preempted.log" 2>&1 & PID=$!
until grep -q '"step": 50,' /tmp/lc_b/metrics.jsonl 2>/dev/null; do kill -0 $PID 2>/dev/null || break; sleep 0.01; done
kill -TERM $PID; wait $PID; echo "preempted rc=$? status=$(grep -o '"status": "[a-z]*"' /tmp/lc_b/status.json)"
ls /tmp/lc_b/checkpoints
$PY -m fine_tune $T hydra.run.dir=/tmp/lc_b resume=true > "$OUT/resumed.log" 2>&1; echo "resumed rc=$?"
$PY - <<'EOF'
import json
def rows(p):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(p)) if "train/loss" in r]
a, b = rows("/tmp/lc_a/metrics.jsonl"), rows("/tmp/lc_b/metrics.jsonl")
print("steps equal:", [s for s, _ in a] == [s for s, _ in b], len(a), len(b))
print("losses identical:", a == b, "max abs diff:", max(abs(x[1] - y[1]) for x, y in zip(a, b)))
print("samples steps:", sorted({json.loads(l)["step"] for l in open("/tmp/lc_a/samples.jsonl")}))
print("metrics.json:", json.load(open("/tmp/lc_a/metrics.json")))
EOF
$PY -m fine_tune.generate run=/tmp/lc_a prompt="Convert 3 km to metres." max_new_tokens=16 show_prompt=true 2>&1 | grep -v -i warn
$PY -m fine_tune.export run=/tmp/lc_a merge=true dtype=bfloat16 2>&1 | grep -v -i warn
$PY -m fine_tune logger=none quant=nf4 trainer.max_steps=20 trainer.eval_steps=10 dataset.max_samples=64 \
  dataset.max_eval_samples=8 hydra.run.dir=/tmp/lc_q > "$OUT/qlora.log" 2>&1; echo "qlora rc=$?"
$PY -m fine_tune.generate run=/tmp/lc_q prompt="What is the capital of France?" max_new_tokens=8 2>&1 | grep -v -i warn
$PY -m fine_tune.export run=/tmp/lc_q merge=true 2>&1 | grep -v -i warn
$PY -m fine_tune.export run=/tmp/lc_q 2>&1 | grep -v -i warn
$PY - <<'EOF'
import json, torch
from transformers import AutoModelForCausalLM
for path in ("/tmp/lc_a/export/merged", "/tmp/lc_q/export/merged"):
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    ids = torch.tensor([[1, 733, 16289, 28793, 16186, 28705, 28770, 733, 28748, 16289, 28793]], device="cuda")
    with torch.no_grad():  # token ids directly: the tokenizer needs mistral-common's deps, not this check
        out = model(input_ids=ids).logits
    cfg = json.load(open(f"{path}/config.json"))
    print(path, "dtype", model.dtype, "quantization_config" in cfg, "logits finite", bool(torch.isfinite(out).all()))
EOF
$PY -m fine_tune validate=true model=mistral_7b model.init=random model.tokenizer=mistral_v1 quant=nf4 trainer=gpu \
  2>&1 | grep -v -i warn | tail -40
grep -h "step .* sample" /tmp/lc_a/__main__.log | tail -2
