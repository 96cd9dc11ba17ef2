#!/usr/bin/env bash
# On the device machine: set up the carried bundles, then run what is asked.
#   bash bench/device_run.sh SHAPE [STEP ...]     (logs and tables under $OUT)
# Steps: gputests (the gpu-marked tests named in GPU_TESTS), sft (bench/sft.py, SFT_ARGS),
# fixed (bench/run.py, FIXED_ARGS). Carry: [".whl", ".whl-unsloth"].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.whl/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d /tmp/unsloth-site ] || python3 -m zipfile -e .whl-unsloth/site.zip /tmp/unsloth-site
shape=$1; shift
folder=/dev/shm/$shape
python3 -c "import sys; sys.path.insert(0, 'bench'); from shapes import make_shape; from pathlib import Path; make_shape('$shape', Path('$folder'))" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    gputests)
      python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/kernels/test_varlen_attention.py} > "$OUT/gputests.log" 2>&1
      tail -25 "$OUT/gputests.log" ;;
    sft)
      python3 bench/sft.py --model "$folder" ${SFT_ARGS:-} --out "$OUT" 2>&1 | grep -v '^{' | tee -a "$OUT/sft.log" ;;
    fixed)
      python3 bench/run.py --shape "$shape" ${FIXED_ARGS:-} --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/fixed.log" ;;
  esac
done
