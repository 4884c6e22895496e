#!/usr/bin/env bash
# The whole CPU suite on the GPU machine's Xeon (AVX512-BF16, AMX), GPU hidden; .whl_call installed earlier.
set -u
T0=$SECONDS
lscpu | grep -E 'Model name|Flags' | cut -c1-200 > $OUT/cpu.txt
python3 -c "import trl, hydra" || { echo "fresh machine: run trl_mixtral.sh (installs .whl_call) first"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl_wandb/*.whl > $OUT/pip.log 2>&1 || { echo "pip failed"; tail $OUT/pip.log; exit 1; }
python3 -c "import site; print(site.getsitepackages()[0])" | xargs -I{} sh -c 'echo $PWD > {}/fine_tune_checkout.pth'
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout ${SUITE_S:-560} python3 -m pytest -q -n ${N:-14} -p no:cacheprovider ${TESTS:-} > $OUT/xeon_suite.log 2>&1
echo "suite exit $? at $((SECONDS - T0)) s"; grep -E "passed|failed|FAILED|ERROR" $OUT/xeon_suite.log | tail -25
