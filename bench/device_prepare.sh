#!/usr/bin/env bash
# Prepare, on this (networked) machine, the Python packages the GPU machine lacks, unpacked into
# .whl/site (git-ignored, carried to the device with `carry: [".whl"]`, used via PYTHONPATH).
#   - bitsandbytes: only the CUDA 13.0 library is kept (43 MB wheel -> ~5 MB)
#   - trl, datasets (+ dill, multiprocess, xxhash), liger-kernel (the "+ Liger" baseline)
# The device image has torch 2.11+cu130, triton 3.6, transformers 5.17, peft, accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DL=.whl/download
SITE=.whl/site
rm -rf "$SITE" && mkdir -p "$DL" "$SITE"
PLATFORM="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORM -d "$DL" \
    bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
    liger-kernel==0.8.5 2>&1 | grep -v "^WARNING: Location" || true
for wheel in "$DL"/*.whl; do
    unzip -q -o "$wheel" -d "$SITE"
done
find "$SITE/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.so' -delete
rm -rf "$DL"
du -sh "$SITE"
