#!/usr/bin/env bash
# Prepare, on this (networked) machine, Unsloth and the packages it needs beside the GPU image, in
# .whl-unsloth/site.zip (git-ignored; carried with `carry: [".whl-unsloth", ".whl"]`, unzipped there to
# /tmp/unsloth-site (`python -m zipfile -e`: the image has no unzip) and put on PYTHONPATH before .whl/site for the unsloth stack only: 90 MB unpacked
# would not fit the 64 MiB a device call may carry, about 20 MB zipped does). Kept apart from .whl/site because Unsloth 2026.10.9 pins
# trl <= 1.15 and datasets < 5, where tuneforge's bundle has trl 1.16 and datasets 5.2; it also
# needs torchao, cut_cross_entropy, msgspec, tyro, json5, structlog, hf_transfer, pydantic and
# diffusers. xformers is optional there (SDPA is used without it) and is left out.
# dill, multiprocess and xxhash (for datasets) come from .whl/site.
# Slimming: Unsloth's wheel carries its "studio" web app (~60 MB unpacked, unused for training);
# bytecode caches and tests are dropped. bitsandbytes comes from .whl/site (run device_prepare.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DL=.whl-unsloth/download
SITE=.whl-unsloth/site
rm -rf "$SITE" && mkdir -p "$DL" "$SITE"
PLATFORM="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORM -d "$DL" \
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 "datasets==4.8.5" torchao==0.18.0 \
    cut_cross_entropy==25.1.1 msgspec==0.22.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.0 \
    shtab==1.13.0 json5==0.17.3 structlog==26.1.0 hf_transfer==0.1.9 pydantic==2.14.3 pydantic_core==2.50.4 \
    annotated_types==0.8.0 typing_inspection==0.4.5 diffusers==0.42.1 einops==0.8.2 nest_asyncio==1.6.0 2>&1 | grep -v "^WARNING: Location" || true
for wheel in "$DL"/*.whl; do
    unzip -q -o "$wheel" -d "$SITE"
done
rm -rf "$SITE/studio" "$SITE/unsloth_cli" "$DL"
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$SITE" -path '*/tests/*' -name '*.py' -delete
(cd "$SITE" && rm -f ../site.zip && zip -q -r -9 ../site.zip .)
rm -rf "$SITE"
du -sh .whl-unsloth/site.zip
