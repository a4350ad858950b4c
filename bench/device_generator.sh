#!/usr/bin/env bash
# Issue 3's gpu-preset check on a lent GPU machine (the `device` tool), which has no ../shared
# and no network: the slices travel as a pack made here first with
#   .venv/bin/python bench/bench_generator.py build --home /tmp/pack-mr --kind mr --size 128 \
#       --pack .gpudata/mr128.npz        (and --kind ct ... .gpudata/ct128.npz)
# and the missing wheels (monai, diffusers, cryptography, cffi, pycparser, importlib_metadata)
# in .whl/. Usage there: bash bench/device_generator.sh mr|ct BUDGET_SECONDS [AE_SHARE]
set -euo pipefail
kind=$1 budget=$2
share=()
[ $# -ge 3 ] && share=(--ae-share "$3")
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
home=/tmp/home-$kind
rm -rf "$home"
python3 bench/bench_generator.py build --home "$home" --kind "$kind" \
    --from-pack ".gpudata/${kind}128.npz"
start=$(date +%s)
python3 bench/bench_generator.py train --home "$home" --preset gpu --budget-s "$budget" "${share[@]}" \
    2> >(tr '\r' '\n' | grep -v '^train: ' > "$out/train-$kind.err") | tail -n 45
echo "train wall (probe, training, quality): $(( $(date +%s) - start )) s"
run=$(ls -d "$home"/runs/train-* | tail -1)
cp "$run"/summary.json "$out/summary-$kind.json"
cp "$run"/quality-*.png "$run"/losses.png "$run"/train.log "$out/" 2>/dev/null || true
python3 bench/bench_generator.py bench --home "$home" --count 256 --ddpm-count 32 \
    --label "$kind 128x128, gpu preset, ${budget} s budget" --results "$out/results-$kind.md"
# Same seed, same images on this machine (issue 3's determinism, here on CUDA).
python3 - "$home" <<'PY'
import sys
import numpy as np
sys.path.insert(0, ".")
from node.config import resolve_home
from node.generator.sampling import load_generator
gen = load_generator(resolve_home(sys.argv[1]))
a, b = (np.asarray(gen.sample(8, seed=7)) for _ in range(2))
c = np.asarray(gen.sample(8, seed=8))
print(f"same seed: max |a-b| = {np.abs(a - b).max():.3g}; other seed: max |a-c| = {np.abs(a - c).max():.3g}")
PY
