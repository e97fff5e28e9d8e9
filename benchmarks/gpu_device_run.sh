#!/bin/bash
# One call on a lent GPU (the `device` tool): install, run the GPU tests, tune the dispatcher's
# table (lutlm/kernels/gpu_tuning.json: batch 1 on every shape set, wider batches on the Llama-2-7B
# and 70B shapes), benchmark GPU decode,
# then every kernel case. Results land in $OUT: copy gpu_kernels.json/.png and gpu_decode.json
# to benchmarks/results/ (named by device) and gpu_tuning.json to the package.
# GPU_TESTS selects the test files (default: every GPU test). At most 8 files come back from $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1 || { tail /tmp/pip.log; exit 1; }
python3 -m pytest -q ${GPU_TESTS:-tests/test_kernels_gpu.py tests/test_gpu_decode.py} > "$OUT/pytest.log" 2>&1
tail -1 "$OUT/pytest.log"
python3 -m lutlm.bench.gpu_kernels --gpu-batch 1 --tune --out /tmp/tuning_rows_b1.json > "$OUT/tuning.log" 2>&1
python3 -m lutlm.bench.gpu_kernels --models llama2-7b,llama2-70b --gpu-bits 2,3,4 --gpu-batch 4,8,16,256 --tune \
    --out /tmp/tuning_rows.json >> "$OUT/tuning.log" 2>&1
cp lutlm/kernels/gpu_tuning.json "$OUT/"
python3 -c "
import argparse, os, pathlib
from lutlm.bench import gpu_decode
gpu_decode.run(argparse.Namespace(position=256, tokens=32, out=pathlib.Path(os.environ['OUT']) / 'gpu_decode.json'))
" 2>&1 | tail -6
python3 -m lutlm.bench.gpu_kernels --out "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.log" 2>&1
grep -E " (1|256) dequant| (1|256)     lut" "$OUT/gpu_kernels.log" | grep -E "^llama2-(7b|70b)\.(qkvo|gate_up|down|q_o) "
