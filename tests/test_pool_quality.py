"""scripts/pool_quality.py pools committed benchmark runs: a sample counts once per (method, prompt, seed)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _read_samples():
    spec = importlib.util.spec_from_file_location("pool_quality", ROOT / "scripts" / "pool_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_samples


def test_a_seed_run_again_adds_no_samples_and_another_seed_does():
    read_samples = _read_samples()
    aa, depth = ROOT / "results" / "quality-100-aa", ROOT / "results" / "mtad-depth-threshold"
    # every bench run re-runs `ar`: seed 0's `ar` is in both folders and must count once
    repeated = read_samples([aa / "seed0", depth / "quality100-seed0"])
    assert len(repeated["ar"]) == 100
    assert len(repeated["eagle-mtad"]) == len(repeated["eagle-mtad:gamma=6,min_joint=0.05"]) == 100
    assert len(read_samples([aa / "seed0", aa / "seed1"])["ar"]) == 200
