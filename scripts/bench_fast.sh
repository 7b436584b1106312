#!/usr/bin/env bash
# The fast-runtime benchmarks of docs/perf.md and the README, in one go (~45 min at 2 threads on a
# quiet 2-core machine): forward cost against the bandwidth floor, then greedy float32, sampling
# float32 and greedy with int8 weights (divergence from float32 ar) on the held-out prompt set,
# every contender of a table in the same run. Usage: bash scripts/bench_fast.sh [THREADS]
# (default: 2; the README's tables used 2 threads with nothing else running)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
SD=".venv/bin/specdecode"
PROMPTS=results/prompts/heldout-12.jsonl
SSD=ssd:profile=src/specdecode/drafts/gemma-3-270m-ssd-profile.json
PEERS=(--peer hf)
.venv/bin/python -c "import llama_cpp" 2>/dev/null && PEERS+=(--peer llama.cpp --peer llama.cpp-pld)
common=(--data "$PROMPTS" --model default --draft default-draft --threads "$THREADS" --max-new-tokens 64
        --repeats 1 --warmup 1 --no-progress)

mkdir -p results/forward-cost
.venv/bin/python scripts/forward_cost.py --threads "$THREADS" --repeats 9 \
  --json results/forward-cost/forward_cost.json | tee results/forward-cost/table.md
echo "python scripts/forward_cost.py --threads $THREADS --repeats 9 --json results/forward-cost/forward_cost.json" \
  > results/forward-cost/COMMAND.txt

$SD bench "${common[@]}" --method ar --method ar@eager --method pld --method pld:gamma=7 --method "$SSD" \
  --method knn-ssd --method sps:gamma=4 --method eagle --method eagle-tree:nodes=10 \
  "${PEERS[@]}" --peer hf-pld --temperature 0 --out results/bench-fast-greedy
$SD bench "${common[@]}" --method ar --method ar@eager --method sps:gamma=4 \
  --method mtad:beams=4,gamma=4,threshold=0.5 --method eagle:gamma=3 --method eagle-mtad "${PEERS[@]}" \
  --temperature 1 --top-k 10 --top-p 0.9 --seed 0 --out results/bench-fast-sampling
# int8 weights (a different target): the float32 reference (ar@eager) and llama.cpp in the same run
$SD bench "${common[@]}" --quantize int8 --method ar --method ar@eager --method pld --method pld:gamma=7 \
  --method "$SSD" --method sps:gamma=4 --peer llama.cpp --temperature 0 --out results/bench-int8-greedy
