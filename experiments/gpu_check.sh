#!/usr/bin/env bash
# GPU check of the Pallas kernels: the GPU-marked kernel tests (with the
# warm-up KL of mla_flash + warmup_kl, T 1000), then the kernel benchmark at
# DeepSeek sizes (T 16K, k 2048, N 64, C 512, R 64, I 64, J 128, bf16; ops in
# the order sparse, indexer, dense, target, logits, later ones skipped when
# the time runs out), all within 8 minutes. Results go under OUTDIR:
#   env.txt          jax version and devices
#   pytest_gpu.txt   pytest -m gpu on tests/test_kernels_*.py (compiled Triton)
#   bench.txt        benchmark table; bench.json its rows
#   summary.txt      exit status of each step and the elapsed seconds
# Usage: experiments/gpu_check.sh OUTDIR     (PYTHON=... to pick the python)
set -u
OUT=${1:?usage: experiments/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# tests/conftest.py only sets JAX_PLATFORMS=cpu when it is unset.
export JAX_PLATFORMS=${GPU_CHECK_PLATFORMS:-cuda}   # override only to dry-run
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# jaxlib 0.10.2-0.11.0: f32 scatter-add with repeated indices (the reference's
# sparse dKV, and the kernel's chunked row reduction) is very slow without it.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_extra_options=-nvptx-allow-ftz-atomics"

TOTAL=${GPU_CHECK_SECONDS:-480}   # the whole check: 8 minutes
START=$(date +%s)
left() { echo $((TOTAL - ($(date +%s) - START))); }
: > "$OUT/summary.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  if [ "$secs" -le 10 ]; then
    echo "$name skipped: no time left" | tee -a "$OUT/summary.txt"
    return
  fi
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc elapsed=$(( $(date +%s) - START ))s" \
    | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.txt"
}

step env 60 "$PY" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
step pytest_gpu 170 "$PY" -m pytest -m gpu -q -rs \
  tests/test_kernels_sparse_mla.py tests/test_kernels_indexer.py \
  tests/test_kernels_mla_flash.py tests/test_kernels_warmup_kl.py
# The benchmark stops starting new measurements 60 s before its deadline.
B=$(( $(left) - 15 ))
step bench "$B" "$PY" experiments/bench_kernels.py --gpu --t 16384 \
  --k 2048 --n 64 --c 512 --r 64 --reps 3 --budget-s $(( B - 60 )) \
  --json "$OUT/bench.json"
echo "total elapsed $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
