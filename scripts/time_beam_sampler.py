"""Time MTAD's beam sampler per drafting round: draft-model forwards vs the sampler's own bookkeeping.

Wraps ``BeamSampleProposer.propose`` and the drafters' ``root`` / ``extend`` at class level, so it
measures any version of the sampler the same way (bookkeeping = propose time − drafter calls,
which include the drafter's own tree-mask construction). Also prints a digest of the generated
tokens: with the same seed, a rewrite that keeps random-number consumption gives the same digest.

    .venv/bin/python scripts/time_beam_sampler.py --prompts 4 --tokens 48 --threads 2

Keep it small: on the 2-core dev box 4 prompts x 48 tokens x 2 methods takes ~1-2 minutes.

``--micro``: the sampler alone, on a drafter that returns fixed random logits (no model), so the
number is bookkeeping only, free of the model's (and a shared machine's) noise. ``--reference
FILE`` times another sampler the same way: ``tests/test_beam_sampler.py`` (its ``_Reference``, the
list-based sampler as it was before the rewrite, with the drafter's logits widened to the
target's 262,144 ids as the shipped draft's were), or a ``beam_sampler.py`` on the current model
API.

    .venv/bin/python scripts/time_beam_sampler.py --micro --reference tests/test_beam_sampler.py --threads 1
    .venv/bin/python scripts/time_beam_sampler.py --reference tests/test_beam_sampler.py --prompts 3 --tokens 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections import defaultdict

import torch



def time_method(cls, name: str, key: str, sink) -> None:
    """Wrap ``cls.name`` so each call adds its seconds to ``sink()[key]`` (``sink`` is read per call:
    the paired mode switches accumulators between versions)."""
    inner = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            sink()[key] += time.perf_counter() - start
    setattr(cls, name, wrapper)

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="/work/shared/data/specbench_dev.jsonl")
    parser.add_argument("--methods", default="mtad,eagle-mtad")
    parser.add_argument("--options", default="", help="method options for every method, e.g. tree=true")
    parser.add_argument("--adaptive", default="", help="BeamSampleProposer attributes set on every proposer, "
                        "e.g. min_joint=0.05,min_share=0.1 (options methods.py may not pass on yet)")
    parser.add_argument("--micro", action="store_true", help="sampler bookkeeping alone, fake drafter")
    parser.add_argument("--reference", help="a beam_sampler.py to time as well: with --micro on the fake "
                        "drafter; else on the model, each prompt run by both versions in turn (paired)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.micro:
        micro(args)
        return
    if args.reference:
        paired(args)
        return

    from specdecode import SpeculativeDecoder, load_model
    from specdecode.methods import parse_option_value
    from specdecode.propose import beam_sampler
    from specdecode.propose.eagle import HeadDrafter

    acc: dict[str, float] = defaultdict(float)

    def timed(cls, name, key):
        time_method(cls, name, key, lambda: acc)

    timed(beam_sampler.BeamSampleProposer, "propose", "propose_s")
    for cls in (beam_sampler.ModelDrafter, HeadDrafter):
        timed(cls, "root", "forward_s")
        timed(cls, "extend", "forward_s")

    target = load_model("default", threads=args.threads)
    draft = load_model("default-draft", threads=args.threads)
    prompts = []
    with open(args.data) as handle:
        rows = [json.loads(line) for line in handle]
    # spread over categories: every len/n-th row
    step = max(1, len(rows) // args.prompts)
    for row in rows[::step][: args.prompts]:
        prompts.append(row["turns"][0])
    options = dict(kv.split("=", 1) for kv in args.options.split(",") if kv)
    options = {k: parse_option_value(v) for k, v in options.items()}
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    for method in args.methods.split(","):
        decoder = SpeculativeDecoder(target, method, draft=draft if method == "mtad" else None, **options)
        adaptive = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.adaptive.split(",") if kv)}
        if adaptive:
            start = decoder._start

            def adaptive_start(settings, start=start):
                proposer, rule = start(settings)
                for key, value in adaptive.items():
                    setattr(proposer, key, value)
                return proposer, rule

            decoder._start = adaptive_start
        decoder.generate(prompts[0], max_new_tokens=8, seed=args.seed, temperature=1.0, top_k=10, top_p=0.9)  # warm
        acc.clear()
        rounds, new_tokens, total, extra = 0, 0, 0.0, defaultdict(float)
        digest = hashlib.sha256()
        for i, prompt in enumerate(prompts):
            result = decoder.generate(prompt, max_new_tokens=args.tokens, seed=args.seed + i,
                                      temperature=1.0, top_k=10, top_p=0.9)
            stats = result.stats
            rounds += stats.target_forwards
            new_tokens += stats.new_tokens
            total += stats.total_s
            for key, value in stats.extra.items():
                if key.startswith("draft_") and isinstance(value, (int, float)):
                    extra[key] += value
            extra["verify_s"] += stats.verify_s
            extra["draft_total_s"] += stats.draft_s
            digest.update(str(result.token_ids).encode())
        bookkeeping = acc["propose_s"] - acc["forward_s"]
        print(f"{method} {args.options or ''} {args.adaptive}: {rounds} rounds, {new_tokens} tokens, tau {new_tokens / rounds:.2f}, "
              f"total {total:.2f}s; per round: propose {1e3 * acc['propose_s'] / rounds:.2f} ms, "
              f"drafter calls {1e3 * acc['forward_s'] / rounds:.2f} ms, "
              f"sampler bookkeeping {1e3 * bookkeeping / rounds:.2f} ms; tokens sha {digest.hexdigest()[:12]}")
        if extra:
            counts = {k: extra.pop(k) for k in ("draft_rounds", "draft_levels", "draft_beams") if k in extra}
            print("  per round: " + ", ".join(f"{k} {1e3 * v / rounds:.2f} ms" for k, v in sorted(extra.items()))
                  + "".join(f", {k} {v / rounds:.2f}" for k, v in counts.items() if k != "draft_rounds")
                  + f"; {new_tokens / total:.2f} tokens/s")


def _load_reference(path: str):
    """(proposer class, model drafter class) of the sampler in ``path``."""
    import importlib.util
    import os
    import sys

    from specdecode.propose.beam_sampler import ModelDrafter

    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # tests/ for tiny_models
    spec = importlib.util.spec_from_file_location("reference_beam_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "_Reference"):
        class WideModelDrafter(ModelDrafter):
            """The drafter as the list-based sampler had it: logits over the target's whole vocabulary."""

            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.vocab_ids = None

        return module._Reference, WideModelDrafter
    return module.BeamSampleProposer, module.ModelDrafter


def _prompts(args) -> list[str]:
    with open(args.data) as handle:
        rows = [json.loads(line) for line in handle]
    step = max(1, len(rows) // args.prompts)  # spread over categories
    return [row["turns"][0] for row in rows[::step][: args.prompts]]


def paired(args) -> None:
    """Current vs ``--reference`` sampler on the model, prompt by prompt in alternating order, so a
    shared machine's load falls on both alike; the same seed must give the same tokens."""
    from types import SimpleNamespace

    from specdecode import SpeculativeDecoder, load_model, methods
    from specdecode.propose import beam_sampler
    from specdecode.propose.eagle import HeadDrafter

    proposer_cls, drafter_cls = _load_reference(args.reference)
    versions = {"current": beam_sampler,
                "reference": SimpleNamespace(BeamSampleProposer=proposer_cls, ModelDrafter=drafter_cls)}
    acc = {name: defaultdict(float) for name in versions}
    running = ["current"]

    def timed(cls, name, key):
        time_method(cls, name, key, lambda: acc[running[0]])

    timed(beam_sampler.BeamSampleProposer, "propose", "propose_s")
    if proposer_cls.propose is not beam_sampler.BeamSampleProposer.propose:
        timed(proposer_cls, "propose", "propose_s")
    for cls in {beam_sampler.ModelDrafter, drafter_cls}:
        timed(cls, "root", "forward_s")
        timed(cls, "extend", "forward_s")
    timed(HeadDrafter, "root", "forward_s")
    timed(HeadDrafter, "extend", "forward_s")
    target = load_model("default", threads=args.threads)
    draft = load_model("default-draft", threads=args.threads)
    prompts = _prompts(args)
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}; "
          f"{len(prompts)} prompts x {args.tokens} tokens, T 1 top-k 10 top-p 0.9, paired")
    for method in args.methods.split(","):
        digests = {name: hashlib.sha256() for name in versions}
        def run(name, prompt, tokens, seed):
            running[0] = name
            methods.BeamSampleProposer = versions[name].BeamSampleProposer
            methods.ModelDrafter = versions[name].ModelDrafter
            decoder = SpeculativeDecoder(target, method, draft=draft if method == "mtad" else None)
            return decoder.generate(prompt, max_new_tokens=tokens, seed=seed, temperature=1.0, top_k=10, top_p=0.9)

        for name in versions:  # warm-up
            run(name, prompts[0], 8, args.seed)
            acc[name].clear()
        for i, prompt in enumerate(prompts):
            for name in (list(versions) if i % 2 else list(reversed(versions))):
                result = run(name, prompt, args.tokens, args.seed + i)
                stats, mine = result.stats, acc[name]
                mine["rounds"] += stats.target_forwards
                mine["tokens"] += stats.new_tokens
                mine["total_s"] += stats.total_s
                mine["verify_s"] += stats.verify_s
                digests[name].update(str(result.token_ids).encode())
        for name in versions:
            a = acc[name]
            rounds = a["rounds"]
            print(f"{method} {name:9s}: {rounds:.0f} rounds, tau {a['tokens'] / rounds:.2f}, "
                  f"{a['tokens'] / a['total_s']:.2f} tokens/s; per round: verify {1e3 * a['verify_s'] / rounds:.1f} ms, "
                  f"propose {1e3 * a['propose_s'] / rounds:.1f} ms = drafter calls {1e3 * a['forward_s'] / rounds:.1f}"
                  f" + sampler {1e3 * (a['propose_s'] - a['forward_s']) / rounds:.1f} ms; "
                  f"tokens sha {digests[name].hexdigest()[:12]}")


class FakeDrafter:
    """Fixed random logits over ``vocab`` rows: ``wide`` returns them scattered into 262,144 columns
    (``-inf`` elsewhere, as the shipped draft's head did before it was narrowed) with no vocab_ids."""

    def __init__(self, vocab: int, wide: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vocab_ids = torch.randperm(262144, generator=generator)[:vocab]
        self.table = torch.randn(64, vocab, generator=generator) * 3
        self.wide = wide
        self.calls = 0
        if wide:
            full = torch.full((64, 262144), float("-inf"))
            full[:, self.vocab_ids] = self.table
            self.table, self.vocab_ids = full, None

    def to_target(self, local):
        return local if self.vocab_ids is None else self.vocab_ids[local]

    def _rows(self, n):
        self.calls += 1
        start = (7 * self.calls) % (64 - n)
        return self.table[start:start + n]

    def root(self, sequence):
        return self._rows(1)[0]

    def extend(self, rows, tokens, visible):
        return self._rows(len(tokens))

    def reset(self):
        pass

    def on_prefill(self, hidden):
        pass

    def observe_hidden(self, hidden):
        pass


def micro(args) -> None:
    from specdecode.propose import beam_sampler
    from specdecode.sampling import SamplingSettings

    versions = {"current": beam_sampler.BeamSampleProposer}
    if args.reference:
        versions["reference"] = _load_reference(args.reference)[0]
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}; "
          f"fake drafter, B 4, gamma 4, {args.rounds} rounds")
    for label, settings in (("T1 k10 p0.9", SamplingSettings(1.0, 10, 0.9)), ("greedy", SamplingSettings())):
        for tree in (False, True):
            for name, module in versions.items():
                for vocab, wide in ((8192, True), (8192, False)):
                    if wide and name == "current":
                        continue  # the current sampler only ever sees a drafter's own ids
                    proposer = module(FakeDrafter(vocab, wide), settings,
                                                         torch.Generator().manual_seed(0), 4, 4, tree=tree)
                    for _ in range(10):
                        proposer.propose([1, 2, 3], 4)
                    t0 = time.perf_counter()
                    for _ in range(args.rounds):
                        proposer.propose([1, 2, 3], 4)
                    ms = 1e3 * (time.perf_counter() - t0) / args.rounds
                    rows = "262144-wide rows" if wide else f"{vocab}-id rows"
                    print(f"  {label:12s} {'tree ' if tree else 'chain'} {name:9s} {rows:17s}: {ms:7.3f} ms/round")


if __name__ == "__main__":
    main()
