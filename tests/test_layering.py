"""The runtime never imports an offline builder.

Decoding (``import specdecode``, the method registry, the engine, every proposer, the artifact
formats) and ``specdecode generate`` must not load scikit-learn, matplotlib, scipy or the offline
packages (``search``, ``routing``, ``distill``, ``bench``, the other CLI subcommands): they cost
seconds of import time and pull the builders' dependencies into a server. Each check runs in a
fresh interpreter, since this test session imports everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
OFFLINE = ("specdecode.search", "specdecode.routing", "specdecode.distill", "specdecode.bench")
THIRD_PARTY = ("sklearn", "matplotlib", "scipy")

# Run in the child: import the decoding path, decode with several methods on a tiny model (knn-ssd
# from a bundle directory on disk), then name every loaded module that the runtime must not load.
DECODING = """
import importlib, json, pkgutil, sys, tempfile
import numpy as np

import specdecode, specdecode.api, specdecode.methods, specdecode.engine.loop, specdecode.artifacts, specdecode.propose
for package in (specdecode.propose, specdecode.artifacts):
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")

from specdecode import SpeculativeDecoder
from specdecode.artifacts.bundle import ProfileBundle
from specdecode.artifacts.profile import SkipProfile
from specdecode.models.layer_skip import SkipSet
from specdecode.artifacts.profile import SelfDraftSettings
from tiny_models import tiny_model

target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
hidden = target.model.config.hidden_size
profile = SkipProfile(SelfDraftSettings(SkipSet.of([1], [2]), threshold=0.05, max_draft=4), target.fingerprint,
                      target.name, 4)
anchors = np.eye(2, hidden)
bundle = ProfileBundle(anchors, ["a", "b"], {"a": profile, "b": profile}, profile, 1.0, target.fingerprint, target.name)
directory = tempfile.mkdtemp()
bundle.save(directory)
runs = {"ar": {}, "pld": {}, "ssd": {"skip_attention": [1]}, "knn-ssd": {"bundle": directory},
        "sps": {"draft": draft}, "mtad": {"draft": draft}}
for method, options in runs.items():
    draft_model = options.pop("draft", None)
    result = SpeculativeDecoder(target, method, draft_model, **options).generate([3, 5, 7, 3, 5], max_new_tokens=6)
    assert len(result.token_ids) == 6, (method, result.token_ids)
print(json.dumps(sorted(sys.modules)))
"""

# Run in the child with a saved tiny model directory: ``specdecode generate`` end to end.
GENERATE = """
import json, sys
from specdecode.cli.main import main

status = main(["generate", "w1 w2 w3", "--model", sys.argv[1], "--max-new-tokens", "4", "--method", "pld", "--json"])
assert status == 0, status
print(json.dumps(sorted(sys.modules)))
"""

# What torch and transformers load by themselves when they build or load a model (scipy, say): not
# the runtime's doing. No specdecode here: this is what the runtime's modules are compared with.
BASELINE = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

if len(sys.argv) > 1:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    AutoTokenizer.from_pretrained(sys.argv[1])
else:
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, vocab_size=97))
print(json.dumps(sorted(sys.modules)))
"""


def _modules(script: str, *args: str) -> set[str]:
    """The modules loaded after ``script`` ran in a fresh interpreter (it prints them as its last line)."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=TESTS,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _forbidden(modules: set[str], baseline: set[str], allowed_cli: tuple[str, ...] = ()) -> list[str]:
    """Loaded modules the runtime must not load: offline packages, the builders' third-party libraries
    (unless torch and transformers load them anyway) and CLI modules other than ``allowed_cli``."""
    def offline(name: str) -> bool:
        if name.split(".")[0] in THIRD_PARTY:
            return name.split(".")[0] not in baseline
        if name.startswith("specdecode.cli."):
            return name not in allowed_cli
        return any(name == package or name.startswith(package + ".") for package in OFFLINE)

    return sorted(name for name in modules if offline(name))


def test_decoding_imports_no_offline_builder():
    baseline = _modules(BASELINE)
    assert not _forbidden(_modules(DECODING), baseline)


def test_cli_generate_imports_only_its_own_subcommand(tmp_path):
    from test_search import _tiny_model_dir

    directory, _ = _tiny_model_dir(tmp_path)
    allowed = ("specdecode.cli.main", "specdecode.cli.common", "specdecode.cli.generate")
    assert not _forbidden(_modules(GENERATE, str(directory)), _modules(BASELINE, str(directory)), allowed)
