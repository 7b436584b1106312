#!/usr/bin/env bash
# The fast-runtime benchmarks of docs/perf.md and the README, in one go (~60 min at 1 thread):
# forward cost against the bandwidth floor, then greedy float32, sampling float32 and greedy with
# float16 weights (divergence from float32 ar) on the held-out prompt set, every contender of a
# table in the same run. Usage: bash scripts/bench_fast.sh [THREADS]   (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-1}
SD=".venv/bin/specdecode"
PROMPTS=results/prompts/heldout-12.jsonl
SSD=ssd:profile=src/specdecode/drafts/gemma-3-270m-ssd-profile.json
PEERS=(--peer hf)
.venv/bin/python -c "import llama_cpp" 2>/dev/null && PEERS+=(--peer llama.cpp --peer llama.cpp-pld)
common=(--data "$PROMPTS" --model default --draft default-draft --threads "$THREADS" --max-new-tokens 64
        --repeats 1 --warmup 1 --no-progress)

mkdir -p results/forward-cost
.venv/bin/python scripts/forward_cost.py --threads "$THREADS" --repeats 5 \
  --json results/forward-cost/forward_cost.json | tee results/forward-cost/table.md
echo "python scripts/forward_cost.py --threads $THREADS --repeats 5 --json results/forward-cost/forward_cost.json" \
  > results/forward-cost/COMMAND.txt

$SD bench "${common[@]}" --method ar --method ar@eager --method pld --method pld:gamma=7 --method "$SSD" \
  --method "$SSD,int8=true" --method knn-ssd --method sps:gamma=4 --method eagle:gamma=3 --method eagle-tree:nodes=10 \
  "${PEERS[@]}" --peer hf-pld --out results/bench-fast-greedy
$SD bench "${common[@]}" --method ar --method ar@eager --method sps:gamma=4 \
  --method mtad:beams=4,gamma=4,threshold=0.5 --method eagle:gamma=3 --method eagle-mtad "${PEERS[@]}" \
  --temperature 1 --top-k 10 --top-p 0.9 --seed 0 --out results/bench-fast-sampling
$SD bench "${common[@]}" --quantize fp16 --method ar --method ar@eager --method pld --method pld:gamma=7 --method "$SSD" \
  --method sps:gamma=4 --out results/bench-fp16-greedy
# the headline run: float16 weights, float32 reference and every peer in one run
$SD bench "${common[@]}" --quantize fp16 --method ar --method ar@eager --method pld --method pld:gamma=7 \
  --method "$SSD" --method sps:gamma=4 "${PEERS[@]}" --peer hf-pld --out results/bench-fp16-peers
