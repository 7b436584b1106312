"""Skip profiles: round trip, use by the ``ssd`` method, and refusal of foreign or corrupt files."""

import json

import pytest

from specdecode import SpeculativeDecoder
from specdecode.artifacts.profile import PROFILE_VERSION, SkipProfile, load_profile, self_draft_settings
from specdecode.errors import InvalidSettingError
from specdecode.models.layer_skip import SkipSet
from specdecode.artifacts.profile import SelfDraftSettings
from tiny_models import tiny_model


def _profile(target, **settings) -> SkipProfile:
    defaults = dict(skip=SkipSet.of([1, 3], [0]), threshold=0.6, max_draft=5, vocab_ids=tuple(range(40, 0, -1)))
    return SkipProfile(SelfDraftSettings(**{**defaults, **settings}), target.fingerprint, target.name, 4,
                       search={"objective": "simulated", "seed": 3}, measured={"tokens_per_second": 12.5})


def test_round_trip(tmp_path):
    target = tiny_model("qwen2")
    profile = _profile(target, int8=True)
    path = profile.save(tmp_path / "sub" / "p.json")
    loaded = load_profile(path, target)
    assert loaded == profile
    assert len(path.read_text().splitlines()) < 40  # the vocabulary stays on one line


def test_method_uses_profile_and_explicit_options_override(tmp_path):
    target = tiny_model("llama")
    path = _profile(target).save(tmp_path / "p.json")
    settings = self_draft_settings(target, str(path))
    assert settings == _profile(target).settings
    overridden = self_draft_settings(target, path, skip_mlp=[], threshold=0.9, draft_vocab=10)
    assert overridden.skip == SkipSet.of([1, 3], [])
    assert overridden.threshold == 0.9 and overridden.max_draft == 5
    assert overridden.vocab_ids == tuple(range(40, 30, -1))  # the 10 most frequent
    assert self_draft_settings(target, path, draft_vocab=0).vocab_ids is None
    ar = SpeculativeDecoder(target, "ar").generate([1, 2, 3], max_new_tokens=20).token_ids
    assert SpeculativeDecoder(target, "ssd", profile=str(path)).generate([1, 2, 3], max_new_tokens=20).token_ids == ar


def test_foreign_profile_is_refused(tmp_path):
    path = _profile(tiny_model("llama", seed=0)).save(tmp_path / "p.json")
    other = tiny_model("llama", seed=1)
    with pytest.raises(InvalidSettingError, match="was searched on model 'tiny-llama-0'.*not on 'tiny-llama-1'"):
        SpeculativeDecoder(other, "ssd", profile=str(path))
    with pytest.raises(InvalidSettingError, match="fingerprint"):
        load_profile(path, other)


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=PROFILE_VERSION + 1), "version 3; this specdecode reads versions 1, 2"),
        (lambda d: d.update(format="something-else"), "not a valid ssd profile: expected a JSON object"),
        (lambda d: d.pop("skip"), r"missing or malformed field \(KeyError: 'skip'\)"),
        (lambda d: d["skip"].update(attention=[7]), "attention layer index 7 out of range: the model has 4"),
        (lambda d: d["skip"].update(mlp="0"), "must be a list of integers"),
        (lambda d: d["draft"].update(threshold=0), r"threshold must be in \(0, 1\]"),
        (lambda d: d["draft"].update(max_draft=0), "max_draft must be an integer >= 1"),
        (lambda d: d["draft"].update(vocab_ids=[1, 1]), "repeats token ids"),
        (lambda d: d["draft"].update(vocab_ids=["a"]), "integer token ids"),
        (lambda d: d["model"].update(layers="4"), "model.layers must be a positive integer"),
    ],
)
def test_malformed_profile_is_refused_with_one_line(tmp_path, change, message):
    target = tiny_model("llama")
    path = _profile(target).save(tmp_path / "p.json")
    _edit(path, change)
    with pytest.raises(InvalidSettingError, match=message) as info:
        load_profile(path, target)
    assert "\n" not in str(info.value)
    assert "p.json" in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InvalidSettingError, match="not found"):
        load_profile(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ')
    with pytest.raises(InvalidSettingError, match="is not valid JSON"):
        load_profile(broken)
    with pytest.raises(InvalidSettingError, match="not found"):
        SpeculativeDecoder(tiny_model("llama"), "ssd", profile=str(tmp_path / "missing.json"))


def test_vocabulary_size_beyond_the_ranked_ids(tmp_path):
    target = tiny_model("llama")
    path = _profile(target).save(tmp_path / "p.json")
    with pytest.raises(InvalidSettingError, match="draft_vocab=41 exceeds the 40 ranked ids"):
        self_draft_settings(target, path, draft_vocab=41)
    no_vocab = _profile(target, vocab_ids=None).save(tmp_path / "q.json")
    with pytest.raises(InvalidSettingError, match="needs a profile with a ranked draft vocabulary"):
        self_draft_settings(target, no_vocab, draft_vocab=8)
