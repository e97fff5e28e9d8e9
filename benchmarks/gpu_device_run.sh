#!/bin/bash
# One call on a lent GPU (the `device` tool): install, run the GPU tests, tune the dispatcher's
# table (lutlm/kernels/gpu_tuning.json) on the Llama-2-7B and 70B shapes, then benchmark every
# kernel case and GPU decode. Results land in $OUT: copy gpu_kernels.json/.png and
# gpu_decode.json to benchmarks/results/ (named by device) and gpu_tuning.json to the package.
set -o pipefail
pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
python3 -m pytest -q tests/test_kernels_gpu.py > "$OUT/pytest.log" 2>&1
python3 -m lutlm.bench.gpu_kernels --models llama2-7b,llama2-70b --gpu-bits 2,4 --gpu-batch 1,16,256 --tune \
    --out "$OUT/tuning_rows.json" > "$OUT/tuning.log" 2>&1
cp lutlm/kernels/gpu_tuning.json "$OUT/"
python3 -m lutlm.bench.gpu_kernels --out "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.log" 2>&1
python3 -c "
import argparse, os, pathlib
from lutlm.bench import gpu_decode
gpu_decode.run(argparse.Namespace(position=256, tokens=32, out=pathlib.Path(os.environ['OUT']) / 'gpu_decode.json'))
" 2>&1 | tail -8
tail -1 "$OUT/pytest.log"
tail -n 205 "$OUT/gpu_kernels.log" | grep -E " (1|256) dequant"
