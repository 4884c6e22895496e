#!/usr/bin/env bash
# TRL's Mixtral-8x7B row: bf16 checkpoint in /dev/shm, from_pretrained with bitsandbytes nf4, SFTTrainer.
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt; df -h /dev/shm /tmp; free -g | head -2
python3 -c "import importlib.metadata as m; print({p: m.version(p) for p in ('torch','transformers','peft','accelerate')})"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl_call/*.whl > $OUT/pip.log 2>&1 || { echo "pip failed"; tail $OUT/pip.log; exit 1; }
python3 -c "import site; print(site.getsitepackages()[0])" | xargs -I{} sh -c 'echo $PWD > {}/fine_tune_checkout.pth'
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
timeout ${TRL_S:-540} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
  --steps 8 --warmup 3 --json $OUT/trl_mixtral.json --systems "${SYSTEMS:-trl_mixtral}" --mixtral-dir /dev/shm/speed_mixtral > $OUT/trl_mixtral.log 2>&1
echo "speed exit $? at $((SECONDS - T0)) s"; grep -v "^ " $OUT/trl_mixtral.log | cut -c1-400 | tail -12
du -sh /dev/shm/speed_mixtral 2>/dev/null
python3 - <<'PY' $OUT/trl_mixtral.json
import json, sys
for k, v in json.load(open(sys.argv[1]))["results"].items():
    print(k, (v.get("error") or "")[-1200:] or v.get("steady_tokens_per_s"))
PY
