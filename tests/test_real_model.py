"""The same guarantees on the embedded Gemma 3 270M (a real 262k-vocabulary model)."""

import pytest

from specdecode import SpeculativeDecoder
from specdecode.models.machine import cache_dir

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to German: The weather is nice today and we are going to the park. Translation:",
]


def test_converted_copy_is_cached(real_model):
    assert any((cache_dir() / "converted").glob("*/model.safetensors"))
    assert real_model.config.model_type == "gemma3_text"
    assert real_model.vocab_size == 262144


def test_greedy_methods_equal_ar(real_model):
    ar = SpeculativeDecoder(real_model, "ar")
    others = [SpeculativeDecoder(real_model, "pld"), SpeculativeDecoder(real_model, "sps", draft=real_model, gamma=3)]
    for prompt in PROMPTS:
        expected = ar.generate(prompt, max_new_tokens=24, stop_at_eos=False)
        for decoder in others:
            result = decoder.generate(prompt, max_new_tokens=24, stop_at_eos=False)
            assert result.token_ids == expected.token_ids, (decoder.method, prompt)
            assert result.text == expected.text


def test_self_draft_accepts_every_token_when_sampling(real_model):
    decoder = SpeculativeDecoder(real_model, "sps", draft=real_model, gamma=4)
    stats = decoder.generate(PROMPTS[0], max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9,
                             seed=0, stop_at_eos=False).stats
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_forward == 5.0


def test_streaming_and_stop_strings(real_model):
    decoder = SpeculativeDecoder(real_model, "pld")
    generation = decoder.start(PROMPTS[0], max_new_tokens=30, stop_at_eos=False)
    streamed = "".join(generation)
    result = generation.result()
    assert streamed == result.text
    stop = result.text.split()[3]
    stopped = decoder.generate(PROMPTS[0], max_new_tokens=30, stop=stop)
    assert stopped.stop_reason == "stop_string"
    assert stop in stopped.text and stopped.text.count(stop) == 1
    assert result.text.startswith(stopped.text)


def test_shipped_draft_serves_sps_and_mtad(real_model):
    from specdecode.models.loading import load_model

    draft = load_model("default-draft")
    assert draft.vocab_size == real_model.vocab_size and draft.tokenizer is None
    prompt = PROMPTS[2]
    expected = SpeculativeDecoder(real_model, "ar").generate(prompt, max_new_tokens=16, stop_at_eos=False)
    sps = SpeculativeDecoder(real_model, "sps", draft=draft, gamma=3).generate(prompt, max_new_tokens=16,
                                                                               stop_at_eos=False)
    assert sps.token_ids == expected.token_ids and sps.stats.draft_forwards > 0
    mtad = SpeculativeDecoder(real_model, "mtad", draft=draft).generate(
        prompt, max_new_tokens=16, temperature=1.0, top_k=10, top_p=0.9, seed=0, stop_at_eos=False)
    assert len(mtad.token_ids) == 16


@pytest.mark.parametrize("quantize", ["fp16", "auto"])
def test_the_shipped_draft_on_its_chosen_weights_keeps_sps_and_greedy_mtad_lossless(real_model, quantize):
    """A draft's weights are a speed choice (models/loading.py: load_draft): float16 copies move the
    draft's probabilities, never the target's output."""
    from specdecode.models.loading import load_draft

    draft = load_draft("default-draft", real_model, quantize=quantize)
    if quantize == "auto":
        assert draft.runtime.chosen_by.startswith("draft weights auto: ")
        assert "float32" in draft.runtime.chosen_by and "fp16" in draft.runtime.chosen_by
    else:
        assert draft.quantize == "fp16"
    prompt = PROMPTS[1]
    expected = SpeculativeDecoder(real_model, "ar").generate(prompt, max_new_tokens=16, stop_at_eos=False)
    for method, options in (("sps", dict(gamma=4)), ("mtad", {})):
        result = SpeculativeDecoder(real_model, method, draft=draft, **options).generate(
            prompt, max_new_tokens=16, stop_at_eos=False)
        assert result.token_ids == expected.token_ids, method
        assert result.stats.draft_forwards > 0


def test_demo_runs_every_method_with_the_shipped_draft_and_profile(real_model, capsys):
    from specdecode.cli.main import main

    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.endswith(("yes", "NO (bug!)"))]
    assert rows == ["ar", "pld", "sps", "ssd", "knn-ssd", "eagle", "eagle-tree", "pld-eagle"] and "NO (bug!)" not in out


def test_int8_target_and_draft_load_and_speculate(real_model):
    """The int8 target calibrates at load; the shipped draft, which cannot run before it is paired
    with its target, loads in int8 too (per-call quantisation) and drafts for the int8 target."""
    from specdecode.models.loading import load_model
    from specdecode.models.kernels import Int8WeightLinear

    target = load_model("default", quantize="int8")
    draft = load_model("default-draft", quantize="int8")
    assert all(m.static is not None for m in target.model.modules() if isinstance(m, Int8WeightLinear))
    assert all(m.static is None for m in draft.model.modules() if isinstance(m, Int8WeightLinear))
    result = SpeculativeDecoder(target, "sps", draft=draft, gamma=3).generate(PROMPTS[0], max_new_tokens=8,
                                                                               stop_at_eos=False)
    assert len(result.token_ids) == 8 and result.stats.draft_forwards > 0


@pytest.mark.parametrize("option, message", [("--init", "draft head"), ("--extra-data", "feature chunks")])
def test_train_head_refuses_bad_inputs_before_generating_data(tmp_path, capsys, option, message):
    import json

    from specdecode.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"q{i}"]}) for i in range(3)))
    assert main(["train-head", option, str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--data", str(data),
                 "--holdout", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "out").exists()
