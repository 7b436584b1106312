"""Bad input gets one clear error, and the decoder stays usable afterwards."""

import argparse

import pytest

from specdecode import SpeculativeDecoder, load_model
from specdecode.cli.main import main
from specdecode.methods import validate_options
from specdecode.errors import (
    InvalidSettingError,
    ModelLoadError,
    PromptError,
    SpecDecodeError,
    VocabularyMismatchError,
)
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.mark.parametrize(
    "settings, error",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(nonsense=1), "nonsense"),
    ],
)
def test_invalid_generation_settings(target, settings, error):
    decoder = SpeculativeDecoder(target, "ar")
    with pytest.raises(InvalidSettingError, match=error):
        decoder.generate([1, 2], **settings)
    assert len(decoder.generate([1, 2], max_new_tokens=3).token_ids) == 3  # still usable


@pytest.mark.parametrize(
    "method, options, error",
    [
        ("pld", dict(gamma=0), "gamma"),
        ("sps", dict(gamma=0), "gamma"),
        ("pld", dict(max_ngram=0), "ngram"),
        ("pld", dict(beam_width=4), "beam_width"),
        ("nosuch", {}, "unknown method 'nosuch'"),
        ("pld", dict(gamma="abc"), "gamma of method 'pld' takes an integer, got 'abc'"),
        ("pld", dict(gamma=2.5), "takes an integer"),
        ("mtad", dict(threshold="high"), "threshold .* takes a number"),
        ("mtad", dict(with_replacement=1), "with_replacement .* takes true or false"),
        ("mtad", dict(min_joint=1.5), r"min_joint .* must be in \[0, 1\)"),
        ("mtad", dict(min_share=-0.1), r"min_share .* must be in \[0, 1\)"),
    ],
)
def test_invalid_method_options(target, method, options, error):
    with pytest.raises(InvalidSettingError, match=error):
        SpeculativeDecoder(target, method, draft=target, **options)


def test_sps_without_draft(target):
    with pytest.raises(InvalidSettingError, match="needs a draft"):
        SpeculativeDecoder(target, "sps")


def test_vocabulary_mismatch(target):
    with pytest.raises(VocabularyMismatchError, match="vocabulary size"):
        SpeculativeDecoder(target, "sps", draft=tiny_model("llama", vocab=50))


def test_prompts(target):
    decoder = SpeculativeDecoder(target, "ar")
    with pytest.raises(PromptError, match="empty"):
        decoder.generate([])
    with pytest.raises(PromptError, match="token ids"):
        decoder.generate([1, 10_000])
    with pytest.raises(PromptError, match="context"):
        decoder.generate([1] * 2040, max_new_tokens=16)
    with pytest.raises(PromptError, match="no tokenizer"):
        decoder.generate("text needs a tokenizer")


def test_unknown_models(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path))  # an existing directory with no model in it
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("default", dtype="float8")


def test_all_errors_are_value_errors():
    assert issubclass(SpecDecodeError, ValueError)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "/nonexistent/dir/model", "hello"],
        ["generate", "--temperature", "-1", "hello"],
        ["generate", "--top-p", "2", "hello"],
        ["generate", "--method", "pld", "--gamma", "0", "hello"],
        ["generate", "--option", "broken", "hello"],
        ["generate", "  "],
        ["generate", "--draft-quantize", "bf16", "hello"],  # argparse's own errors: one line too
        ["generate", "--no-such-flag", "hello"],
        ["no-such-command"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_cli_and_bench_read_method_options_alike():
    """``--option tree=true`` once failed as "takes true or false, got 'true'": the generate CLI
    read values with literal_eval while ``bench`` also knew the words true / false / none."""
    from specdecode.bench.contenders import parse_spec
    from specdecode.cli.common import method_kwargs

    args = argparse.Namespace(option=["tree=true", "with_replacement=False", "threshold=0.3", "head=runs/x"])
    expected = {"tree": True, "with_replacement": False, "threshold": 0.3, "head": "runs/x"}
    assert method_kwargs(args) == expected
    assert parse_spec("eagle-mtad:" + ",".join(args.option)).options == expected
    validate_options("eagle-mtad", expected)


def test_a_draft_weight_format_that_does_not_exist_is_refused_before_loading():
    from specdecode.models.loading import load_draft

    with pytest.raises(InvalidSettingError, match="draft quantize must be one of auto, none, fp16, int8"):
        load_draft("default-draft", None, quantize="bf16")


def test_a_draft_length_below_one_is_refused_before_any_model_loads():
    """``--gamma 0`` once loaded the 1 GB target (and on a fresh machine printed its one-time
    kernel tuning) before the proposer refused it."""
    for method in ("pld", "sps", "eagle", "mtad"):
        with pytest.raises(InvalidSettingError, match="gamma .* must be >= 1, got 0"):
            validate_options(method, {"gamma": 0})
    validate_options("pld", {"gamma": 1})
