import time, httpx, threading
urls = {"old": "http://127.0.0.1:8125", "new": "http://127.0.0.1:8126"}
def body(m, n=64): return {"model": "default", "prompt": "Write a long story about a dragon who learns to cook.", "max_tokens": n, "temperature": 0, "speculative": {"method": m}}
for u in urls.values(): httpx.post(u + "/v1/completions", json=body("ar", 8), timeout=300); httpx.post(u + "/v1/completions", json=body("pld", 8), timeout=300)
tot = {(s, m, c): 0.0 for s in urls for m in ("ar", "pld") for c in (1, 4)}
toks = dict(tot)
for rep in range(3):
    for m in ("ar", "pld"):
        for c in (1, 4):
            for s in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                res = []
                def go(): res.append(httpx.post(urls[s] + "/v1/completions", json=body(m), timeout=300).json()["usage"]["completion_tokens"])
                t = time.perf_counter(); th = [threading.Thread(target=go) for _ in range(c)]
                [x.start() for x in th]; [x.join() for x in th]
                tot[(s, m, c)] += time.perf_counter() - t; toks[(s, m, c)] += sum(res)
for m in ("ar", "pld"):
    for c in (1, 4):
        o, n = toks[("old", m, c)] / tot[("old", m, c)], toks[("new", m, c)] / tot[("new", m, c)]
        print(f"{m} c={c}: old {o:.1f} tok/s  new {n:.1f} tok/s  new/old {n/o:.3f}")
