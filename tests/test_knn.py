"""KNN-SSD: routing, bundles (round trip, refusals), the knn-ssd method's exactness, the stream, the CLI."""

import json
import random

import numpy as np
import pytest

from specdecode import SpeculativeDecoder
from specdecode.bench.dataset import BenchPrompt
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.layer_skip import SkipSet
from specdecode.propose.self_draft import SelfDraftSettings
from specdecode.routing.build import build_bundle, embed_prompts, fallback_radius, fit_anchors
from specdecode.routing.bundle import MIXED, ProfileBundle, Route, load_bundle
from specdecode.routing.evaluate import mixed_stream
from specdecode.search.profile import SkipProfile
from test_search import _tiny_model_dir
from tiny_models import ARCHITECTURES, VOCAB, tiny_model


def _profile(fingerprint: str, skip: SkipSet = SkipSet(), layers: int = 4) -> SkipProfile:
    return SkipProfile(SelfDraftSettings(skip, threshold=0.05, max_draft=4), fingerprint, "m", layers)


def _clusters(rng: np.random.Generator, centres: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    vectors = {}
    for category, centre in centres.items():
        rows = centre + 0.05 * rng.standard_normal((count, len(centre)))
        vectors[category] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return vectors


@pytest.fixture()
def synthetic():
    """Three well-separated clusters on the unit sphere (axes 0, 1, 2 of 8 dimensions)."""
    rng = np.random.default_rng(0)
    centres = {name: np.eye(8)[i] for i, name in enumerate(["qa", "math", "code"])}
    vectors = _clusters(rng, centres, 12)
    anchors, labels = fit_anchors(vectors, anchors_per_category=3)
    radius = fallback_radius(anchors, np.concatenate(list(vectors.values())))
    profiles = {c: _profile("fp", SkipSet.of([i], [])) for i, c in enumerate(centres)}
    bundle = ProfileBundle(anchors, labels, profiles, _profile("fp", SkipSet.of([], [3])), radius, "fp", "m")
    return bundle, centres, rng


def test_routing_picks_the_cluster_of_each_query(synthetic):
    bundle, centres, rng = synthetic
    assert bundle.labels == ["qa"] * 3 + ["math"] * 3 + ["code"] * 3
    for category, queries in _clusters(rng, centres, 20).items():
        for query in queries:
            route = bundle.route(query)
            assert (route.category, route.profile, route.fallback) == (category, category, False)
            assert bundle.profile(route) is bundle.profiles[category]


def test_far_query_falls_back_to_the_mixed_profile(synthetic):
    bundle, _, _ = synthetic
    route = bundle.route(np.eye(8)[5])  # a direction no calibration prompt had
    assert route.fallback and route.profile == MIXED and route.distance > bundle.radius
    assert bundle.profile(route) is bundle.mixed
    assert bundle.route(None) == Route(MIXED, None, True, MIXED)  # nothing to embed (one-token prompt)


def test_bundle_round_trip(synthetic, tmp_path):
    bundle, centres, rng = synthetic
    bundle.save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert np.allclose(loaded.anchors, bundle.anchors) and loaded.labels == bundle.labels
    assert loaded.radius == bundle.radius and loaded.fingerprint == "fp"
    assert {c: p.settings for c, p in loaded.profiles.items()} == {c: p.settings for c, p in bundle.profiles.items()}
    assert loaded.mixed.settings == bundle.mixed.settings
    assert load_bundle(tmp_path / "b" / "bundle.json").labels == bundle.labels
    for query in _clusters(rng, centres, 3)["math"]:
        assert loaded.route(query) == bundle.route(query)


def test_bundle_of_another_model_is_refused(synthetic, tmp_path):
    bundle, _, _ = synthetic
    bundle.save(tmp_path / "b")
    target = tiny_model("llama")
    with pytest.raises(InvalidSettingError, match=r"was built on model 'm' \(fingerprint fp\), not on 'tiny-llama-0'"):
        load_bundle(tmp_path / "b", target)
    with pytest.raises(InvalidSettingError, match="was built on model 'm'"):
        SpeculativeDecoder(target, "knn-ssd", bundle=str(tmp_path / "b"))
    with pytest.raises(InvalidSettingError, match="needs bundle=PATH"):
        SpeculativeDecoder(target, "knn-ssd")


def _corrupt_manifest(key, value):
    def change(directory):
        data = json.loads((directory / "bundle.json").read_text())
        data[key] = value
        (directory / "bundle.json").write_text(json.dumps(data))
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "bundle.json").write_text("{not json"), "cannot read bundle"),
    (_corrupt_manifest("version", 99), "has bundle version 99; this specdecode reads version 1"),
    (_corrupt_manifest("format", "other"), "is not a KNN-SSD bundle"),
    (_corrupt_manifest("labels", ["qa"]), "is invalid: bundle has 1 anchor labels but anchors of shape"),
    (_corrupt_manifest("radius", -1), "radius must be a positive number"),
    (_corrupt_manifest("labels", ["qa"] * 8 + ["rag"]), "anchors labelled rag have no profile"),
    (lambda d: (d / "anchors.npz").write_bytes(b"garbage"), "is corrupt or incomplete"),
    (lambda d: (d / "profiles" / "qa.json").unlink(), r"profile .*qa.json' not found"),
    (lambda d: (d / "profiles" / "mixed.json").write_text("[]"), "is not a valid ssd profile"),
    (lambda d: (d / "bundle.json").unlink(), "not found"),
])
def test_corrupt_bundle_is_refused_with_one_line(synthetic, tmp_path, change, message):
    bundle, _, _ = synthetic
    directory = bundle.save(tmp_path / "b")
    change(directory)
    with pytest.raises(InvalidSettingError, match=message) as info:
        load_bundle(directory)
    assert "\n" not in str(info.value)


def test_profile_of_another_model_inside_a_bundle_is_refused(synthetic):
    bundle, _, _ = synthetic
    with pytest.raises(InvalidSettingError, match="profile 'mixed' was searched on model"):
        ProfileBundle(bundle.anchors, bundle.labels, bundle.profiles, _profile("other"), bundle.radius, "fp", "m")


def test_empty_category_and_too_few_prompts_are_refused():
    rows = np.eye(4)
    with pytest.raises(InvalidSettingError, match="category 'qa' has no prompts"):
        fit_anchors({"qa": rows[:0], "math": rows}, anchors_per_category=2)
    with pytest.raises(InvalidSettingError, match="category 'qa' has 3 prompt.s., fewer than the 4 anchors"):
        fit_anchors({"qa": rows[:3], "math": rows}, anchors_per_category=4)
    with pytest.raises(InvalidSettingError, match="'mixed' is reserved"):
        fit_anchors({MIXED: rows}, anchors_per_category=1)
    with pytest.raises(InvalidSettingError, match="anchors per category must be an integer >= 1"):
        fit_anchors({"qa": rows}, anchors_per_category=0)
    with pytest.raises(InvalidSettingError, match="category 'qa' has no prompts"):
        build_bundle(tiny_model("llama"), {"qa": [], "math": ["a b"]}, anchors_per_category=1)


def _tiny_bundle(target, rng: random.Random) -> tuple[ProfileBundle, dict[str, list[list[int]]]]:
    """Two 'categories' of prompts over disjoint token ranges (a random model need not separate them),
    each with a random skip profile."""
    prompts = {"low": [[rng.randrange(0, VOCAB // 2) for _ in range(rng.randint(3, 10))] for _ in range(6)],
               "high": [[rng.randrange(VOCAB // 2, VOCAB) for _ in range(rng.randint(3, 10))] for _ in range(6)]}
    vectors = {c: embed_prompts(target, ids) for c, ids in prompts.items()}
    anchors, labels = fit_anchors(vectors, anchors_per_category=2)
    radius = fallback_radius(anchors, np.concatenate(list(vectors.values())))

    def random_profile() -> SkipProfile:
        skip = SkipSet.of(rng.sample(range(4), rng.randint(0, 3)), rng.sample(range(4), rng.randint(0, 3)))
        return _profile(target.fingerprint, skip)

    profiles = {c: random_profile() for c in prompts}
    return ProfileBundle(anchors, labels, profiles, random_profile(), radius, target.fingerprint, target.name), prompts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_knn_ssd_equals_ar_and_routes_like_the_offline_embedding(arch):
    target = tiny_model(arch, seed=1)
    rng = random.Random(f"knn-{arch}")
    bundle, prompts = _tiny_bundle(target, rng)
    ar = SpeculativeDecoder(target, "ar")
    knn = SpeculativeDecoder(target, "knn-ssd", bundle=bundle)
    for rows in prompts.values():
        for prompt in rows[:3]:
            max_new = rng.choice([3, 30])  # 30 crosses Gemma's sliding window of 8 several times
            result = knn.generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == ar.generate(prompt, max_new_tokens=max_new).token_ids
            route = result.stats.extra["route"]
            offline = bundle.route(embed_prompts(target, [prompt])[0])
            assert route["category"] == offline.category and route["distance"] == pytest.approx(offline.distance)
            assert result.stats.draft_forwards > 0
    single = knn.generate([5], max_new_tokens=4)  # no prefill: the mixed profile drafts
    assert single.stats.extra["route"]["profile"] == MIXED and single.stats.extra["route"]["distance"] is None
    assert single.token_ids == ar.generate([5], max_new_tokens=4).token_ids


def test_mixed_stream_switches_as_asked():
    prompts = {c: [BenchPrompt(f"{c}{i}", c, "t") for i in range(4)] for c in ("a", "b", "c")}

    def switches(stream):
        return sum(x.category != y.category for x, y in zip(stream, stream[1:]))

    for ratio in (0.0, 0.5, 1.0):
        stream = mixed_stream(prompts, ratio, seed=3)
        assert sorted(p.question_id for p in stream) == sorted(p.question_id for rows in prompts.values() for p in rows)
        assert [p.question_id for p in stream if p.category == "a"] == ["a0", "a1", "a2", "a3"]
        if ratio == 0.0:
            assert switches(stream) == 2
        if ratio == 1.0:
            assert switches(stream) == 11
    with pytest.raises(InvalidSettingError, match=r"mix ratio must be in \[0, 1\]"):
        mixed_stream(prompts, 1.5)


def test_embedding_needs_two_tokens():
    with pytest.raises(PromptError, match="cannot be embedded"):
        embed_prompts(tiny_model("llama"), [[3]])


def test_cli_build_generate_eval_and_reuse(tmp_path, capsys):
    from specdecode.cli.main import main

    directory, _ = _tiny_model_dir(tmp_path)
    rng = random.Random(5)
    data = tmp_path / "knn.jsonl"
    ranges = {"qa": range(1, 40), "math": range(50, VOCAB)}
    data.write_text("\n".join(
        json.dumps({"category": c, "turns": [" ".join(f"w{rng.choice(ranges[c])}" for _ in range(8))]})
        for c in ["qa", "math"] for _ in range(5)))
    out = tmp_path / "bundle"
    build = ["build-knn", "--model", str(directory), "--data", str(data), "--prompts-per-category", "4",
             "--anchors", "2", "--search-prompts", "2", "--max-new-tokens", "6", "--iterations", "1",
             "--init-points", "1", "--threshold", "0.05", "--no-measure", "--no-progress", "--out", str(out)]
    assert main(build) == 0
    bundle = load_bundle(out)
    assert bundle.categories == ["qa", "math"] and len(bundle.labels) == 4
    assert (out / "tsne.png").stat().st_size > 0 and (out / "profiles" / "mixed.json").exists()
    assert bundle.settings["prompt_template"] == "User: {turn}\nAssistant:"
    capsys.readouterr()

    assert main(["generate", "w1 w2 w3", "--model", str(directory), "--method", "knn-ssd", "--bundle", str(out),
                 "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["extra"]["route"]["category"] in ("qa", "math")

    report = tmp_path / "eval"
    assert main(["knn-eval", "--bundle", str(out), "--data", str(data), "--model", str(directory), "--per-category",
                 "1", "--max-new-tokens", "6", "--warmup", "0", "--no-progress", "--out", str(report)]) == 0
    table = (report / "knn.md").read_text()
    for name in ("`ar`", "`ssd[mixed]`", "`ssd[qa]`", "`ssd[math]`", "`knn-ssd`"):
        assert name in table
    summary = json.loads((report / "knn.json").read_text())
    assert summary["stream"] == ["math-4", "qa-4"] or summary["stream"] == ["qa-4", "math-4"]
    assert all(m["identical"] == m["prompts"] == 2 for m in summary["methods"].values())
    assert summary["routing"]["overall"]["requests"] == 2
    assert "Cross-domain matrix" in table and (report / "domain_matrix.png").stat().st_size > 0
    matrix = summary["domain_matrix"]  # every profile on every category, one prompt each
    assert set(matrix) == {"ssd[mixed]", "ssd[qa]", "ssd[math]", "knn-ssd"}
    assert all(set(cells) == {"qa", "math"} and all(c["tau"] >= 1 for c in cells.values()) for cells in matrix.values())
    capsys.readouterr()

    assert main([*build[:-1], str(tmp_path / "again"), "--profiles-dir", str(out / "profiles")]) == 0
    err = capsys.readouterr().err
    assert err.count("(reused)") == 3 and not (tmp_path / "again" / "checkpoints").exists()
    assert load_bundle(tmp_path / "again").mixed.settings == bundle.mixed.settings


@pytest.mark.parametrize("argv, message", [
    (["--categories", "qa,rag"], "category 'rag' has 0 prompts in knn.jsonl; 4 from offset 0 need 4"),
    (["--anchors", "5"], "category 'qa' has 4 prompt(s), fewer than the 5 anchors per category"),
    (["--search-prompts", "9"], "--search-prompts 9 exceeds --prompts-per-category 4"),
    (["--profiles-dir", "/nonexistent"], "--profiles-dir '/nonexistent' is not a directory"),
    (["--min-skip", "-1"], "--min-skip must be >= 0, got -1"),
])
def test_cli_build_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    from specdecode.cli.main import main

    directory, _ = _tiny_model_dir(tmp_path)
    data = tmp_path / "knn.jsonl"
    data.write_text("\n".join(json.dumps({"category": c, "turns": [f"w{i} w{i + 1} w3"]})
                              for c in ("qa", "math") for i in range(4)))
    capsys.readouterr()
    assert main(["build-knn", "--model", str(directory), "--data", str(data), "--prompts-per-category", "4",
                 "--search-prompts", "2", "--no-progress", "--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_cli_eval_bad_bundle_exits_2_with_one_line(tmp_path, capsys):
    from specdecode.cli.main import main

    (tmp_path / "d.jsonl").write_text('{"category": "qa", "turns": ["w1 w2"]}\n')
    assert main(["knn-eval", "--bundle", str(tmp_path / "none"), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: bundle {str(tmp_path / 'none')!r} not found "
                                               "(expected a directory with bundle.json)")


@pytest.mark.real_model
def test_real_model_knn_ssd_routes_and_equals_ar(real_model):
    """Hand-made profiles (no search): the embedded Gemma separates two kinds of prompt, and
    greedy knn-ssd reproduces ar with whichever profile it picks."""
    kinds = {"translate": [f"Translate to French: {s}" for s in ("the cat sleeps", "good morning", "I like tea",
                                                                 "where is the station")],
             "arith": [f"Compute {a} + {b} =" for a, b in ((3, 4), (12, 9), (70, 5), (8, 8))]}
    ids = {c: [real_model.tokenizer(t)["input_ids"] for t in texts] for c, texts in kinds.items()}
    vectors = {c: embed_prompts(real_model, rows) for c, rows in ids.items()}
    anchors, labels = fit_anchors(vectors, anchors_per_category=2)
    radius = fallback_radius(anchors, np.concatenate(list(vectors.values())))
    fingerprint, layers = real_model.fingerprint, real_model.config.num_hidden_layers
    profiles = {"translate": _profile(fingerprint, SkipSet.of([14, 15], [16, 17]), layers),
                "arith": _profile(fingerprint, SkipSet.of([12], [13, 17]), layers)}
    bundle = ProfileBundle(anchors, labels, profiles, _profile(fingerprint, SkipSet.of([17], []), layers), radius,
                           fingerprint, real_model.name)
    knn, ar = SpeculativeDecoder(real_model, "knn-ssd", bundle=bundle), SpeculativeDecoder(real_model, "ar")
    for category, prompt in (("translate", "Translate to French: the dog runs"), ("arith", "Compute 41 + 6 =")):
        result = knn.generate(prompt, max_new_tokens=16)
        assert result.stats.extra["route"]["category"] == category
        assert result.token_ids == ar.generate(prompt, max_new_tokens=16).token_ids


@pytest.mark.real_model
def test_shipped_bundle_serves_the_default_model_with_no_bundle_option(real_model):
    """`specdecode generate --method knn-ssd` works with no --bundle on the embedded default."""
    knn, ar = SpeculativeDecoder(real_model, "knn-ssd"), SpeculativeDecoder(real_model, "ar")
    prompt = "Translate German to English: Das Wetter ist heute schön."
    result = knn.generate(prompt, max_new_tokens=12)
    assert result.stats.extra["route"]["category"] in ("translation", "summarization", "qa", "math_reasoning",
                                                       "rag", None)
    assert result.token_ids == ar.generate(prompt, max_new_tokens=12).token_ids
