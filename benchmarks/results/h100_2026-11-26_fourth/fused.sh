#!/usr/bin/env bash
# fused LoRA on/off (nf4, bf16) in one call, losses compared; then the fused tests on the Xeon (GPU hidden).
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt; lscpu | grep 'Model name' > $OUT/cpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl_call/*.whl > $OUT/pip.log 2>&1 || { echo "pip failed"; tail $OUT/pip.log; exit 1; }
python3 -c "import site; print(site.getsitepackages()[0])" | xargs -I{} sh -c 'echo $PWD > {}/fine_tune_checkout.pth'
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
echo "setup done at $((SECONDS - T0)) s"
timeout ${SPEED_S:-420} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/speed.json --systems "$SYSTEMS" > $OUT/speed.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -E '^\||Error|"losses"' $OUT/speed.log | cut -c1-300
python3 - <<'PY' $OUT/speed.json
import json,sys
d=json.load(open(sys.argv[1]))
for k,v in (d.get("results", d) if isinstance(d, dict) else {}).items():
    if isinstance(v, dict): print(k, v.get("losses"), v.get("steady_tokens_per_s"), v.get("peak_gib"))
PY
LEFT=$((570 - (SECONDS - T0)))
if [ $LEFT -gt 60 ]; then
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout $LEFT python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_fused_lora.py tests/test_engine.py > $OUT/xeon_tests.log 2>&1
  echo "xeon tests exit $? at $((SECONDS - T0)) s"; tail -4 $OUT/xeon_tests.log
fi
