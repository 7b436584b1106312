"""Screens by row count (interleaved medians) and candidate counts on real hidden states."""
import json, statistics, time, torch
from specdecode import load_model
from specdecode.models.runner import Readout
from specdecode.models.heads import ScreenedHead
t = load_model("default", dtype="float32", threads=2)
print(t.runner.plan.head.describe())
w = t.runner.plan.head.weight
head = ScreenedHead(w, None, None)  # auto: every screen offered, tuned
print("tuned:", head.describe())
heads = {name: ScreenedHead(w, None, None, screens=name) for name in ("int8", "q8", "dpbf16")}
prompts = [json.loads(l) for l in open("results/chain-attention/prompts-16.jsonl")]
text = " ".join(p.get("turns", [p.get("prompt", "")])[0] if isinstance(p, dict) else str(p) for p in prompts[:4])
ids = t.tokenizer(text)["input_ids"][:300] if t.tokenizer is not None else list(range(300))
with torch.inference_mode():
    hidden = t.runner.forward(t.runner.new_cache(), ids, Readout.hidden_only()).hidden
    print("hidden rows", hidden.shape)
    for name, h in heads.items():
        counts = [len(h.top_columns(hidden[i:i + 8], 1)[0]) for i in range(0, 144, 8)]
        print(f"{name}: candidates per 8-row call median {statistics.median(counts)} max {max(counts)}")
    for rows in (1, 4, 8, 12, 16, 20, 32, 64):
        x = hidden[:rows].contiguous()
        ts = {n: [] for n in heads}
        for rep in range(7):
            for n, h in (list(heads.items()) if rep % 2 == 0 else list(heads.items())[::-1]):
                a = time.perf_counter(); h.top_columns(x, 1); ts[n].append(time.perf_counter() - a)
        print(f"rows {rows:2d}: " + "  ".join(f"{n} {statistics.median(v)*1e3:6.2f}" for n, v in ts.items()), flush=True)
