"""Pooled perplexity with a paired bootstrap over prompts, and repetition, from a bench records.jsonl."""
import json, math, random, sys
from collections import defaultdict

records = [json.loads(l) for l in open(sys.argv[1])]
by = defaultdict(dict)
for r in records:
    if r.get("nll") is not None:
        by[r["method"]][r["question_id"]] = (r["nll"], len(r["token_ids"]), r["token_ids"])
methods = list(by)
base = "ar"
prompts = sorted(set.intersection(*(set(v) for v in by.values())))

def ppl(m, ids):
    nll = sum(by[m][q][0] for q in ids); n = sum(by[m][q][1] for q in ids)
    return math.exp(nll / n)

def repeated_4gram_share(m, ids):
    rep = tot = 0
    for q in ids:
        t = by[m][q][2]; grams = [tuple(t[i:i + 4]) for i in range(len(t) - 3)]
        seen = set()
        for g in grams:
            rep += g in seen; seen.add(g); tot += 1
    return rep / max(1, tot)

rng = random.Random(0)
out = {"prompts": len(prompts), "methods": {}}
for m in methods:
    diffs = []
    for _ in range(2000):
        sample = [rng.choice(prompts) for _ in prompts]
        diffs.append(math.log(ppl(m, sample)) - math.log(ppl(base, sample)))
    diffs.sort()
    out["methods"][m] = {"pooled_perplexity": round(ppl(m, prompts), 3),
                         "log_ppl_minus_ar_95ci": [round(diffs[50], 3), round(diffs[1949], 3)],
                         "repeated_4gram_share": round(repeated_4gram_share(m, prompts), 3)}
print(json.dumps(out, indent=1))
