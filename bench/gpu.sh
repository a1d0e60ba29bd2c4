#!/usr/bin/env bash
# The GPU benchmarks of issue 5 in one command, from the repository root of a checkout (nothing is installed):
#
#   bash bench/gpu.sh                              # writes out/gpu-<UTC date-time>/ with SUMMARY.md
#   PYTHON=/opt/conda/bin/python bash bench/gpu.sh # a given interpreter (CUDA jax and torch preinstalled)
#   BERTGEN_GPU_BENCH_TINY=1 bash bench/gpu.sh     # rehearsal with tiny shapes, on any machine (CPU too)
#   bash bench/gpu.sh --steps generate-bf16,train-bf16   # a subset of the steps (see bench/gpu.py)
#
# The interpreter: $PYTHON if set; else the first of .venv/bin/python and python3 whose jax sees a GPU; else
# (no GPU anywhere: only the tiny rehearsal can run) the first of them that imports jax. The checkout goes on
# PYTHONPATH; transformers 4.57 Flax runs from .venv-tf457/bin/python or $BERTGEN_FLAX457_PYTHON when usable.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

jax_backend() {  # prints jax's default backend for interpreter $1, or nothing
  "$1" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  candidates=()
  [ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
  command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")
  for c in "${candidates[@]}"; do
    if [ "$(jax_backend "$c")" = "gpu" ]; then PY="$c"; break; fi
  done
  if [ -z "$PY" ]; then
    for c in "${candidates[@]}"; do
      if [ -n "$(jax_backend "$c")" ]; then PY="$c"; break; fi
    done
  fi
  if [ -z "$PY" ]; then
    echo "bench/gpu.sh: no python with jax found (tried: ${candidates[*]:-none}); set PYTHON=..." >&2
    exit 2
  fi
fi
echo "bench/gpu.sh: python $PY"
exec "$PY" bench/gpu.py "$@"
