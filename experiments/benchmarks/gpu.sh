#!/usr/bin/env bash
# GPU measurements of issue 15, in priority order, each step time-limited; results are written
# as each step ends (OUT/<step>.json, OUT/<step>.log), so a machine taken back mid-way keeps them.
#
#   bash experiments/benchmarks/gpu.sh OUT [--tiny]
#
# Needs no network: jax (CUDA), flax, optax, orbax, chex and transformers installed; the one
# package a GPU image may lack, ml_collections, is installed from .whl/ (carry it with the
# working tree). Run from the repository root. --tiny: tiny sizes (test the script on a CPU).
# About ten minutes in all on an H100/H200.
set -u
OUT=${1:?usage: gpu.sh OUT [--tiny]}
TINY=${2:-}
mkdir -p "$OUT"
if ! python -c "import ml_collections" 2>/dev/null; then
  pip install --no-index --no-deps --target /tmp/fedms_site .whl/*.whl >"$OUT/pip.log" 2>&1
  export PYTHONPATH="/tmp/fedms_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python -c "import jax; print(jax.__version__, jax.devices())" >"$OUT/devices.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

if [ "$TINY" = "--tiny" ]; then
  step startup_vitb32 300 python experiments/benchmarks/startup.py --tiny --only vitb32 --dtype float32,bfloat16 --out "$OUT/startup_vitb32"
  step startup_default 600 python experiments/benchmarks/startup.py --tiny --only default --out "$OUT/startup_default"
  step suite_w2 300 python experiments/benchmarks/suite.py --tiny --only backends --out "$OUT/suite_w2"
  exit 0
fi
# 1. build, compile per phase, first round and s/round of the ViT-B/32 shape, fp32 then bf16
step startup_vitb32 240 python experiments/benchmarks/startup.py --only vitb32 --dtype float32,bfloat16 --rounds 6 --out "$OUT/startup_vitb32"
# 2. the default job, cold and warm persistent cache
step startup_default 150 python experiments/benchmarks/startup.py --only default --out "$OUT/startup_default"
# 3. W2 vmap vs sequential at 16 / 64 / 256 clients (the peer ratio's numerator)
step suite_w2 150 python experiments/benchmarks/suite.py --only backends --out "$OUT/suite_w2"
