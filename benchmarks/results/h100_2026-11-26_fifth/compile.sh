#!/usr/bin/env bash
# trainer.torch_compile measured: nf4 baseline vs whole-model compile (A), then regional compile (B).
set -u
T0=$SECONDS
nvidia-smi -L > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl_call/*.whl > $OUT/pip.log 2>&1 || { echo "pip failed"; tail $OUT/pip.log; exit 1; }
python3 -c "import site; print(site.getsitepackages()[0])" | xargs -I{} sh -c 'echo $PWD > {}/fine_tune_checkout.pth'
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
E1=trainer.checkpointing.every_n_layers=1
run() {  # $1 tag, $2 systems, $3 seconds
  timeout $3 python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
    --steps ${STEPS:-12} --warmup ${WARM:-5} --json $OUT/$1.json --systems "$2" > $OUT/$1.log 2>&1
  echo "$1 exit $? at $((SECONDS - T0)) s"; grep -E '^\||Error|"losses"|recompil|graph break' $OUT/$1.log | cut -c1-300 | head -30
}
run whole "${SYS_A:-fine_tune_nf4@$E1,fine_tune_nf4@$E1+trainer.torch_compile=true}" ${A_S:-330}
ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1 run regional "${SYS_B:-fine_tune_nf4@$E1+trainer.torch_compile=true}" $((575 - (SECONDS - T0)))
