#!/usr/bin/env bash
# FastVideo for the GPU machine, which has no internet and no FastVideo: download fastvideo 0.2.1 and exactly the
# packages the import of its causal Wan and Matrix-Game 2.0 models needs, as wheels for the device's CPython 3.12
# on manylinux x86_64, into .whl/ (git-ignored: /.whl/ in .gitignore). The device image has torch 2.11.0+cu130,
# triton, numpy and pytest with their dependencies (filelock, fsspec, jinja2, networkx, sympy, typing_extensions,
# packaging, ...): not downloaded. torchvision is imported by fastvideo/utils.py at import time: 0.26.0+cu130, the
# build matching torch 2.11.0. scipy (35 MB) is left out: only FastVideo's schedulers call it, and
# tests/integrations/fastvideo_env.py puts a stand-in in its place. About 44 MB in 27 wheels.
# Carry .whl/ to the device with the session (run: carry [".whl", "streamkern/_C.cpython-312-x86_64-linux-gnu.so"]);
# bench/gpu_session.sh's fastvideo phase installs it with
#   pip install --no-index --no-deps --no-compile --upgrade --target <dir> .whl/*.whl   and PYTHONPATH=<dir>.
# Usage: tools/fetch_device_wheels.sh   (PYTHON: the pip to use, default python3; needs the package index)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  fastvideo==0.2.1 torchvision==0.26.0
  transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19
  diffusers==0.42.1 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5
  requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
  pillow==13.0.0 imageio==2.38.2 PyYAML==6.0.4 tqdm==4.70.1 einops==0.8.2 cloudpickle==3.1.3 remote-pdb==2.1.0
  ftfy==6.3.1 wcwidth==0.9.4 psutil==7.2.2
)
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${WHEELS[@]}"
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sm .whl | cut -f1) MB in .whl/"
