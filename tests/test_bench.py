"""The benchmark: spec parsing, prompt files, metric arithmetic, the identity check and the CLI,
on tiny random models with a tiny character tokenizer (no downloads)."""

from __future__ import annotations

import itertools
import json
import math
import string

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdecode import methods
from specdecode.accept.rules import GreedyMatch, Verdict
from specdecode.bench import BenchConfig, DatasetError, load_prompts, parse_spec, run_bench, write_report
from specdecode.bench.dataset import BenchPrompt
from specdecode.bench.metrics import EnergyMeter, aggregate, first_mismatch, generated_nll
from specdecode.bench.report import summarize
from specdecode.bench.record import Record
from specdecode.bench.runner import build_contenders
from specdecode.cli.main import main
from specdecode.engine.stats import GenerationStats
from specdecode.errors import InvalidSettingError, SpecDecodeError
from specdecode.models.loading import LoadedModel
from specdecode.propose.base import Draft, Proposer
from tiny_models import VOCAB, perturbed_copy, tiny_model

CHARS = string.ascii_letters + string.digits + " .,:?!'\n-"


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    return loaded


ROWS = [
    {"question_id": 1, "category": "translation", "turns": ["Translate: la la la la la la"]},
    {"question_id": 2, "category": "qa", "turns": ["What is 2 + 2? What is 2 + 2?", "second turn ignored"]},
    {"question_id": 3, "category": "writing", "turns": ["Write a poem about a cat cat cat."]},
    {"question_id": 4, "category": "qa", "turns": ["Who wrote it? who wrote it? who"]},
    {"question_id": 5, "category": "translation", "turns": ["Translate: ab ab ab ab ab"]},
    {"question_id": 6, "category": "roleplay", "turns": ["Pretend you are a pirate pirate."]},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


class AcceptEverything(GreedyMatch):
    """A deliberately wrong greedy rule: keeps every draft token without checking it."""

    def __call__(self, draft: Draft, target_logits: torch.Tensor) -> Verdict:
        return Verdict(len(draft), int(target_logits[len(draft)].argmax()))


class NextIdProposer(Proposer):
    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        tokens = [(sequence[-1] + 1 + i) % VOCAB for i in range(min(3, max_tokens))]
        self.stats.proposed += len(tokens)
        return Draft(tokens)


class Exploding(Proposer):
    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        raise InvalidSettingError("this method fails mid-run")


@pytest.fixture()
def broken_methods(monkeypatch):
    monkeypatch.setitem(methods._REGISTRY, "broken", lambda ctx: (NextIdProposer(), AcceptEverything()))
    monkeypatch.setitem(methods._REGISTRY, "exploding", lambda ctx: (Exploding(), GreedyMatch()))


# --- specs -----------------------------------------------------------------------------------------

def test_parse_spec_types_and_label():
    spec = parse_spec("pld:gamma=10,max_ngram=3")
    assert (spec.name, spec.options, spec.label) == ("pld", {"gamma": 10, "max_ngram": 3}, "pld:gamma=10,max_ngram=3")
    assert parse_spec("sps:adaptive-gamma=true").options == {"adaptive_gamma": True}
    assert parse_spec("hf-early-exit:schedule=heuristic,confidence=0.3").options == {
        "schedule": "heuristic", "confidence": 0.3}
    assert parse_spec("ar").label == "ar"
    with pytest.raises(InvalidSettingError, match="'gamma' in 'pld:gamma'"):
        parse_spec("pld:gamma")


def test_unknown_and_misplaced_names_are_refused(target):
    sampling = BenchConfig().sampling
    with pytest.raises(InvalidSettingError, match="unknown method 'nope'"):
        build_contenders(target, None, ["nope"], [], sampling)
    with pytest.raises(InvalidSettingError, match="unknown peer 'hf-nope'"):
        build_contenders(target, None, [], ["hf-nope"], sampling)
    with pytest.raises(InvalidSettingError, match="unknown option.*typo.*'hf-pld'"):
        build_contenders(target, None, [], ["hf-pld:typo=1"], sampling)
    with pytest.raises(InvalidSettingError, match="'hf' is a transformers peer"):
        build_contenders(target, None, ["hf"], [], sampling)
    with pytest.raises(InvalidSettingError, match="listed twice: pld"):
        build_contenders(target, None, ["pld", "pld"], [], sampling)
    with pytest.raises(InvalidSettingError, match="needs a draft"):
        build_contenders(target, None, [], ["hf-assisted"], sampling)
    labels = [c.label for c in build_contenders(target, None, ["pld"], ["hf"], sampling)]
    assert labels == ["ar", "pld", "hf"]  # ar is always the baseline


def test_draft_with_another_vocabulary_is_refused(target, data_file):
    other = tiny_model("llama", vocab=VOCAB + 3)
    with pytest.raises(SpecDecodeError, match="vocabulary size"):
        run_bench(target, load_prompts(data_file), ["ar"], ["hf-assisted"], draft=other, progress=False)


# --- prompt files -------------------------------------------------------------------------------

def test_prompt_selection(data_file):
    everything = load_prompts(data_file)
    assert [p.question_id for p in everything] == [1, 2, 3, 4, 5, 6]
    assert everything[1].turn == "What is 2 + 2? What is 2 + 2?"  # first turn only
    firsts = load_prompts(data_file, ["qa", "translation"], per_category=1)
    assert [p.question_id for p in firsts] == [1, 2]
    mt = load_prompts(data_file, ["mt_bench"])
    assert [(p.category, p.task) for p in mt] == [("writing", "mt_bench"), ("roleplay", "mt_bench")]


def test_malformed_lines_are_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ROWS[0])
    cases = {
        '{"question_id": 2, "category": "qa", "turns": ["x"]': "not valid JSON",
        '{"question_id": 2, "turns": ["x"]}': "missing field.*category",
        '{"question_id": 2, "category": "qa", "turns": []}': "'turns' must be a list",
        "[1, 2]": "expected a JSON object",
    }
    for bad, why in cases.items():
        path.write_text(f"{good}\n\n{bad}\n{good}\n")  # blank line 2 is skipped but counted
        with pytest.raises(DatasetError, match=rf"bad\.jsonl:3: {why}"):
            load_prompts(path)


def test_unknown_category_and_missing_file(data_file, tmp_path):
    with pytest.raises(DatasetError, match="unknown category 'poetry'.*translation, qa, writing"):
        load_prompts(data_file, ["qa", "poetry"])
    with pytest.raises(DatasetError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidSettingError, match="per-category"):
        load_prompts(data_file, per_category=0)


# --- metric arithmetic --------------------------------------------------------------------------

def _record(label, task, seconds, tokens, forwards, proposed=0, accepted=(), draft_s=0.0, verify_s=1.0,
            identical=None, nll=None):
    stats = GenerationStats(new_tokens=tokens, target_forwards=forwards, proposed_tokens=proposed,
                            accepted_lengths=list(accepted), draft_s=draft_s, verify_s=verify_s)
    prompt = BenchPrompt(0, task, "x")
    return Record(prompt, label, 3, [0] * tokens, list(seconds), stats, identical=identical, nll=nll)


def test_aggregate_arithmetic():
    ar = [_record("ar", "qa", [2.0], 10, 10), _record("ar", "qa", [4.0], 10, 10)]
    fast = [
        _record("x", "qa", [1.0, 3.0, 1.2], 10, 4, proposed=12, accepted=[3, 2, 1, 0], draft_s=0.5, verify_s=2.0,
                identical=True, nll=10 * math.log(2)),
        _record("x", "qa", [2.0], 10, 6, proposed=8, accepted=[1, 1, 1, 1, 0, 0], draft_s=0.5, verify_s=3.0,
                identical=False, nll=10 * math.log(4)),
    ]
    cell = aggregate(fast, ar)
    assert cell.seconds == pytest.approx(1.2 + 2.0)  # per prompt: median of its repeats
    assert cell.tokens_per_second == pytest.approx(20 / 3.2)
    assert cell.speedup == pytest.approx((20 / 3.2) / (20 / 6.0))
    assert cell.tau == pytest.approx(20 / 10)
    assert cell.acceptance_rate == pytest.approx(10 / 20)
    assert cell.draft_cost == pytest.approx(1.0 / 5.0)
    assert cell.identical == 1
    assert cell.perplexity == pytest.approx(math.exp((10 * math.log(2) + 10 * math.log(4)) / 20))  # = sqrt(8)
    assert cell.energy_per_token_j is None
    baseline = aggregate(ar, ar)
    assert (baseline.speedup, baseline.tau, baseline.acceptance_rate, baseline.draft_cost) == (1.0, 1.0, None, None)


def test_energy_is_not_invented_on_a_cpu(tmp_path):
    meter = EnergyMeter(torch.device("cpu"), powercap=tmp_path / "no-powercap")
    assert meter.unavailable.startswith("not measured: cpu run") and meter.read_j() is None


def test_cpu_energy_sums_the_rapl_packages_across_a_wraparound(tmp_path):
    """The kernel's powercap layout: package zones intel-rapl:N with energy_uj (and sub-zones
    intel-rapl:N:M, which the packages already include)."""
    for zone, value in (("intel-rapl:0", 999_000_000), ("intel-rapl:1", 5_000_000), ("intel-rapl:0:0", 7)):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(f"{value}\n")
        (tmp_path / zone / "max_energy_range_uj").write_text("1000000000\n")
    meter = EnergyMeter(torch.device("cpu"), powercap=tmp_path)
    assert meter.unavailable is None and meter.read_j() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2000000\n")  # wrapped: +3 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("6500000\n")  # +1.5 J
    assert meter.read_j() == pytest.approx(4.5)


def test_first_mismatch():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 5, 3], [1, 2, 3]) == 1
    assert first_mismatch([1, 2], [1, 2, 3]) == 2


def test_generated_nll_matches_a_plain_forward(target):
    prompt, generated = [5, 6, 7, 8], [9, 10, 11]
    with torch.no_grad():
        logits = target.model(torch.tensor([prompt + generated])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = -sum(float(log_probs[len(prompt) - 1 + i, tok]) for i, tok in enumerate(generated))
    assert generated_nll(target, prompt, generated) == pytest.approx(expected, rel=1e-9)


# --- whole runs ---------------------------------------------------------------------------------

def test_greedy_run_flags_a_wrong_method_and_reports(target, data_file, tmp_path, broken_methods):
    prompts = load_prompts(data_file)
    config = BenchConfig(max_new_tokens=12, repeats=2, warmup=1)
    result = run_bench(target, prompts, ["ar", "pld:gamma=4", "broken"], ["hf", "hf-pld:num_tokens=4"],
                       config=config, progress=False)
    assert len(result.records) == len(prompts) * 5
    assert all(len(r.seconds) == 2 and len(r.token_ids) == 12 for r in result.records)
    assert all(r.identical for r in result.records if r.label != "broken")  # peers and pld equal ar
    assert list(result.mismatches()) == ["broken"]
    hf_pld = [r for r in result.records if r.label == "hf-pld:num_tokens=4"]
    assert sum(r.stats.proposed_tokens for r in hf_pld) > 0  # the forward hooks saw its drafts

    written = write_report(result, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"records.jsonl", "table.md", "summary.json", "speedup_per_category.png", "tau_distribution.png"}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "IDENTITY CHECK FAILED: `broken`" in table
    assert "| translation | qa | mt_bench |" not in table and "| mt_bench | translation | qa | overall |" in table
    assert "Fastest lossless method:" in table and "`broken`**" not in table
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(result.records)
    assert json.loads(lines[0])["identical_to_ar"] is True
    assert (tmp_path / "out" / "tau_distribution.png").read_bytes()[:4] == b"\x89PNG"


def test_draft_model_method_and_peer(target, data_file):
    draft = perturbed_copy(target, 0.05)
    result = run_bench(target, load_prompts(data_file, ["qa"]), ["sps:gamma=3"], ["hf-assisted:num_tokens=3"],
                       draft=draft, config=BenchConfig(max_new_tokens=10, warmup=0), progress=False)
    assert all(r.identical for r in result.records)
    for label in ("sps:gamma=3", "hf-assisted:num_tokens=3"):
        stats = [r.stats for r in result.of(label)]
        assert sum(s.draft_forwards for s in stats) > 0 and sum(s.accepted_tokens for s in stats) > 0


def test_sampling_run_scores_perplexity(target, data_file):
    prompts = load_prompts(data_file, ["qa"])
    config = BenchConfig(max_new_tokens=8, temperature=1.0, top_k=20, warmup=0)
    result = run_bench(target, prompts, ["ar", "pld"], ["hf"], config=config, progress=False)
    assert all(r.identical is None and r.nll is not None and r.nll > 0 for r in result.records)
    ar = result.of("ar")
    assert ar[0].token_ids != ar[1].token_ids  # prompts get different seeds
    from specdecode.bench import render_table

    table = render_table(result)
    assert "## Quality (sampling)" in table and "| `pld` |" in table.split("## Quality (sampling)")[1]


def test_report_breaks_a_round_down_and_states_the_zero_draft_ceiling(target, data_file):
    """Per drafting method: ms per round for drafting (MTAD's beam sampler by part), verification and
    acceptance, and the speedup were drafting free (tokens over the time not spent drafting)."""
    from specdecode.bench import render_table

    config = BenchConfig(max_new_tokens=8, temperature=1.0, top_k=20, warmup=0)
    result = run_bench(target, load_prompts(data_file, ["qa"]), ["ar", "pld", "mtad:gamma=3,beams=2"], [],
                       draft=target, config=config, progress=False)
    mtad = summarize(result)["mtad:gamma=3,beams=2"]["overall"]
    assert set(mtad.round_ms) == {"draft", "forward", "bookkeeping", "tree", "verify", "accept"}
    assert mtad.round_ms["draft"] >= mtad.round_ms["forward"] > 0 and mtad.round_ms["verify"] > 0
    assert mtad.zero_draft_speedup > mtad.speedup
    table = render_table(result).split("## Per-round cost")[1]
    assert "| mtad:gamma=3,beams=2 |" in table and "| pld |" in table and "| ar |" not in table


@pytest.fixture()
def model_dir(tmp_path_factory, target):
    path = tmp_path_factory.mktemp("tiny")
    target.model.save_pretrained(path)
    target.tokenizer.save_pretrained(path)
    return path


def test_cli_writes_everything_and_exits_3_on_identity_failure(model_dir, data_file, tmp_path, capsys,
                                                               broken_methods):
    out = tmp_path / "run"
    argv = ["bench", "--data", str(data_file), "--model", str(model_dir), "--dtype", "float64",
            "--category", "qa", "--per-category", "1", "--method", "pld:gamma=3", "--peer", "hf",
            "--max-new-tokens", "6", "--warmup", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert main(argv + ["--method", "broken"]) == 3
    captured = capsys.readouterr()
    assert "!!! **IDENTITY CHECK FAILED: `broken`" in captured.err
    assert "| `pld:gamma=3` |" in captured.out
    command = (out / "COMMAND.txt").read_text()
    assert command.startswith("specdecode bench --data ") and "--method pld:gamma=3 --method broken" in command


@pytest.mark.parametrize("bad, message", [
    (["--category", "poetry"], "error: unknown category 'poetry'"),
    (["--method", "nope"], "error: unknown method 'nope'"),
    (["--method", "exploding"], "error: this method fails mid-run"),
])
def test_cli_errors_write_nothing(model_dir, data_file, tmp_path, capsys, broken_methods, bad, message):
    out = tmp_path / "run"
    argv = ["bench", "--data", str(data_file), "--model", str(model_dir), "--max-new-tokens", "4",
            "--warmup", "0", "--no-progress", "--out", str(out), *bad]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [data_file]


def test_eager_suffix_parses_and_labels():
    spec = parse_spec("pld:gamma=4@eager")
    assert (spec.name, spec.options, spec.eager, spec.label) == ("pld", {"gamma": 4}, True, "pld:gamma=4@eager")
    assert parse_spec("ar").eager is False


def test_reduced_precision_run_reports_divergence_instead_of_failing(model_dir, data_file, tmp_path, capsys):
    """With float16 weights, ar@eager is the float32 reference; differences from ar are numerics,
    reported in a divergence table, and never the identity failure (exit 3)."""
    out = tmp_path / "run"
    argv = ["bench", "--data", str(data_file), "--model", str(model_dir), "--dtype", "float32",
            "--quantize", "fp16", "--category", "qa", "--method", "ar", "--method", "ar@eager",
            "--method", "pld:gamma=3", "--max-new-tokens", "8", "--warmup", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert "## Divergence from float32 `ar` (reduced precision)" in table
    assert "| `pld:gamma=3` |" in table and "quantize: fp16" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["exact"] is False and summary["meta"]["quantize"] == "fp16"
    assert "--quantize fp16" in (out / "COMMAND.txt").read_text()


def test_fast_runtime_and_eager_ar_agree_in_float32(model_dir, data_file, tmp_path):
    from specdecode.models.loading import load_model

    target = load_model(str(model_dir), dtype="float32")
    result = run_bench(target, load_prompts(data_file, ["qa"]), ["ar", "ar@eager", "pld"], ["hf"],
                       config=BenchConfig(max_new_tokens=10, warmup=0), progress=False)
    assert "screened exact float32 head" in result.meta["runtime"] and result.meta["exact"]
    assert all(r.identical for r in result.records) and not result.mismatches()


def test_llamacpp_peer_needs_a_gguf_model(target):
    with pytest.raises(SpecDecodeError, match="llama"):
        build_contenders(target, None, ["ar"], ["llama.cpp"], BenchConfig().sampling)


def _scored(nll: float, tokens: list[int], prompt_id: int = 0) -> Record:
    prompt = BenchPrompt(prompt_id, "qa", "q")
    return Record(prompt, "m", 3, tokens, [1.0], GenerationStats(new_tokens=len(tokens), target_forwards=1),
                  nll=nll)


def test_quality_interval_separates_a_real_difference_from_noise():
    from specdecode.bench.quality import compare_quality, repeated_ngram_share

    rng = __import__("random").Random(0)
    base = [_scored(rng.uniform(50, 150), list(range(64)), i) for i in range(100)]
    same = [_scored(r.nll * rng.uniform(0.8, 1.25), list(range(64)), i) for i, r in enumerate(base)]
    lower = [_scored(r.nll * 0.7, list(range(64)), i) for i, r in enumerate(base)]
    noise, real = compare_quality(same, base), compare_quality(lower, base)
    assert noise.interval[0] < 0 < noise.interval[1] and not noise.significant
    assert real.significant and real.interval[1] < 0
    assert abs(real.change_vs_ar - (math.exp(0.7 * sum(r.nll for r in base) / 6400
                                            - sum(r.nll for r in base) / 6400) - 1)) < 1e-9
    assert repeated_ngram_share([[1, 2, 3, 4] * 4]) == 9 / 13
    assert repeated_ngram_share([list(range(16))]) == 0.0
    assert compare_quality([_scored(1.0, [1])], [Record(base[0].prompt, "ar", 3, [1], [1.0], GenerationStats())]) is None


def test_several_seeds_of_a_prompt_are_one_bootstrap_unit():
    """Seeds are pooled per prompt: the same outputs twice must not look like 200 independent prompts."""
    from specdecode.bench.quality import Sample, compare_samples

    rng = __import__("random").Random(1)
    base = [Sample(i, rng.uniform(50, 150), 64, tuple(range(64))) for i in range(100)]
    ours = [Sample(s.prompt, s.nll * rng.uniform(0.7, 1.2), 64, s.token_ids) for s in base]
    once, twice = compare_samples(ours, base), compare_samples(ours * 2, base * 2)
    assert twice.interval == pytest.approx(once.interval) and twice.change_vs_ar == pytest.approx(once.change_vs_ar)
    assert compare_samples(ours[:50], base) is None  # not the same prompts


@pytest.mark.parametrize("interval", ["bootstrap", "t"])
def test_aa_calibration_on_heavy_tailed_samples(interval):
    """One method against itself under other seeds: with per-prompt perplexities spread over two
    orders of magnitude and heavy-tailed samples, the interval excludes 0 in about 5 % of splits;
    a real 10 % change is found."""
    from specdecode.bench.quality import Sample, aa_exclusion_rate, compare_samples

    rng = np.random.default_rng(3)
    level = rng.lognormal(1.0, 0.8, size=100)  # a prompt's mean NLL per token
    samples = [Sample(p, float(32 * level[p] * rng.lognormal(0, 0.5)), 32, tuple(range(32)))
               for p in range(100) for _ in range(6)]
    rate = aa_exclusion_rate(samples, 3, interval, splits=100)
    assert rate <= 0.12, rate
    lower = [Sample(s.prompt, s.nll * 0.9, s.tokens, s.token_ids) for s in samples[::2]]
    found = compare_samples(lower, samples[1::2], interval=interval)
    assert found.significant and found.interval[1] < 0
    with pytest.raises(ValueError, match="needs 8 samples"):
        aa_exclusion_rate(samples, 4)


def test_aa_calibration_catches_an_interval_that_is_too_narrow():
    """The calibration must be able to fail: an interval of half the width excludes 0 far more often."""
    import specdecode.bench.quality as quality

    rng = np.random.default_rng(5)
    samples = [quality.Sample(p, float(32 * rng.lognormal(0, 0.5)), 32, (1,)) for p in range(60) for _ in range(2)]
    honest = quality.aa_exclusion_rate(samples, 1, "t", splits=100)
    original = quality.compare_samples

    def narrow(*args, **kwargs):
        result = original(*args, **kwargs)
        mid = (result.interval[0] + result.interval[1]) / 2
        half = (result.interval[1] - result.interval[0]) / 4
        return quality.QualityComparison(result.perplexity, result.change_vs_ar, (mid - half, mid + half),
                                         result.repeated_ngram_share)

    quality.compare_samples = narrow
    try:
        assert quality.aa_exclusion_rate(samples, 1, "t", splits=100) > max(0.15, 2 * honest)
    finally:
        quality.compare_samples = original


def test_prompt_files_split_on_newlines_only(tmp_path):
    """A line separator (U+2028) or form feed inside a JSON string is text, not the end of a record
    (``str.splitlines`` would cut the record there: seen in a real Spec-Bench-style file)."""
    from specdecode.search.calibration import load_labelled_prompts

    path = tmp_path / "odd.jsonl"
    turns = ["first\u2028second\x0cthird", "plain"]
    path.write_text("\n".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}, ensure_ascii=False)
                              for i, t in enumerate(turns)) + "\n", encoding="utf-8")
    assert [p.turn for p in load_prompts(path)] == turns
    assert [prompt for _, prompt in load_labelled_prompts(path)] == turns


def test_concurrency_mode_reports_aggregate_and_decoding_rates(model_dir, data_file, tmp_path, capsys, monkeypatch):
    """``--concurrency``: every method at every level, lossless per request (float32), a decoding
    rate that leaves each wave's prefill out (so it is above the aggregate one), and the methods
    interleaved wave by wave (a drift of the machine hits them alike)."""
    from specdecode.bench.contenders import OurMethod

    started = []
    real_start = OurMethod.start
    monkeypatch.setattr(OurMethod, "start", lambda self, *args: started.append(self.label) or real_start(self, *args))
    out = tmp_path / "throughput"
    argv = ["bench", "--data", str(data_file), "--model", str(model_dir), "--dtype", "float32",
            "--method", "pld:gamma=3", "--concurrency", "1,2", "--adaptive-drafts", "--max-new-tokens", "6",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert "## Decoding only" in table and "| `pld:gamma=3` |" in table
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {(r["method"], r["concurrency"]) for r in rows} == {(m, c) for m in ("ar", "pld:gamma=3") for c in (1, 2)}
    for row in rows:
        assert 0 < row["prefill_seconds"] < row["seconds"]
        assert row["differing_from_solo"] == 0
    prompts = rows[0]["requests"]
    solo = started[2 * 2:2 * 2 + 2 * prompts]  # after the warm-up (a wave of 2 a method): c = 1, one start a wave
    runs = [len(list(group)) for _, group in itertools.groupby(solo)]
    assert len(solo) == 2 * prompts and max(runs) <= 2, solo  # not one method's prompts all in a row
    capsys.readouterr()
