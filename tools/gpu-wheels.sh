#!/usr/bin/env bash
# Wheels for what the GPU machine lacks (Python 3.12, x86-64): the notebooks' kernel and test
# runner, ipywidgets, diffusers for `minisd bench unet`, and for CLIP's byte-pair tokenizer and
# chapter 11 regex, transformers and ftfy. Writes ./wheels (git-ignored), which
# tools/gpu-check.sh installs from. Packages that machine already has are left out to keep the
# folder small enough to carry (NOTES: torch, numpy, pillow, pytest, tqdm, safetensors, matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf wheels
python3 -m pip download -q -d wheels --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  nbval ipykernel ipywidgets diffusers importlib_metadata transformers regex ftfy
rm -f wheels/numpy-* wheels/pillow-* wheels/pytest-* wheels/pluggy-* wheels/iniconfig-* wheels/tqdm-* \
  wheels/safetensors-* wheels/packaging-*
du -sh wheels
