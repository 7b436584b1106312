"""KNN-SSD: routing, bundles (round trip, refusals), the knn-ssd method's exactness, the stream, the CLI."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from specdecode import SpeculativeDecoder
from specdecode.artifacts.bundle import MIXED, ProfileBundle, Route, load_bundle
from specdecode.artifacts.profile import SkipProfile, load_profile
from specdecode.bench.dataset import BenchPrompt
from specdecode.bench.knn_eval import mixed_stream
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.layer_skip import SkipSet
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.routing.anchors import embed_prompts, fallback_radius, fit_anchors
from specdecode.routing.build import build_bundle
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
    assert loaded.radii == bundle.radii and loaded.fingerprint == "fp"
    assert loaded.revision == 1
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


def _corrupt_manifest(change_data):
    def change(directory):
        data = json.loads((directory / "bundle.json").read_text())
        change_data(data)
        (directory / "bundle.json").write_text(json.dumps(data))
    return change


def _rewrite(file, text):
    """Replace a bundle file and record its new checksum, so only the content is wrong."""
    def change(directory):
        (directory / file).write_bytes(text)
        data = json.loads((directory / "bundle.json").read_text())
        digest = hashlib.sha256(text).hexdigest()
        if file.startswith("profiles/mixed"):
            data["mixed"]["sha256"] = digest
        else:
            kind = "anchors" if file.startswith("anchors/") else "profile"
            data["domains"][file.split("/")[1].rsplit(".", 1)[0]]["sha256"][kind] = digest
        (directory / "bundle.json").write_text(json.dumps(data))
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "bundle.json").write_text("{not json"), "cannot read bundle"),
    (_corrupt_manifest(lambda d: d.update(version=99)), "has bundle version 99; this specdecode reads versions 1, 2"),
    (_corrupt_manifest(lambda d: d.update(format="other")), "is not a KNN-SSD bundle"),
    (_corrupt_manifest(lambda d: d["domains"]["qa"].update(radius=-1)), "radius of 'qa' must be a positive number"),
    (_corrupt_manifest(lambda d: d["domains"]["qa"].update(anchors="anchors/math.npy")),
     "anchors/math.npy does not match its SHA-256"),
    (_corrupt_manifest(lambda d: d.update(domains={})), "bundle has no domains"),
    (lambda d: (d / "anchors" / "qa.npy").write_bytes(b"garbage"), "anchors/qa.npy does not match its SHA-256"),
    (lambda d: (d / "profiles" / "math.json").write_text("{}"), "profiles/math.json does not match its SHA-256"),
    (_rewrite("anchors/qa.npy", b"garbage"), "is corrupt or incomplete"),
    (lambda d: (d / "profiles" / "qa.json").unlink(), r"is corrupt or incomplete \(FileNotFoundError"),
    (_rewrite("profiles/mixed.json", b"[]"), "is not a valid ssd profile"),
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


def test_knn_ssd_in_a_batch_equals_each_request_alone_and_drafts_together_by_route():
    """In a batch (the fast runtime's batched forwards), every knn-ssd request decodes what it
    decodes alone, and requests routed to the same profile share one batch key (they draft
    together), those routed elsewhere do not."""
    from specdecode.engine.batch import BatchStepper
    from specdecode.models.loading import LoadedModel
    from specdecode.models.runtime import build_runtime

    base = tiny_model("llama", seed=1)
    model = base.model.float()
    target = LoadedModel(model, None, base.name, runtime=build_runtime(model))
    bundle, prompts = _tiny_bundle(target, random.Random("knn-batch"))
    knn = SpeculativeDecoder(target, "knn-ssd", bundle=bundle)
    batch = [p for rows in prompts.values() for p in rows[:3]]
    alone = [knn.generate(p, max_new_tokens=20).token_ids for p in batch]
    generations = [knn.start(p, max_new_tokens=20) for p in batch]
    BatchStepper(generations).run()
    assert [g.result().token_ids for g in generations] == alone
    routes = [g.stats.extra["route"]["profile"] for g in generations]
    keys = [g.proposer.batch_key() for g in generations]
    assert len(set(routes)) > 1 and len(set(keys)) == len(set(routes))
    assert all((a == b) == (keys[i] == keys[j]) for i, a in enumerate(routes) for j, b in enumerate(routes))


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
    (["--search-prompts", "9"], "--search-prompts 9 must be below --prompts-per-category 4 (the other build prompts "
                                "rank the vocabulary)"),
    (["--profiles-dir", "/nonexistent"], "--profiles-dir '/nonexistent' is not a directory"),
    (["--vocab-sources", "answers,bogus"], "vocabulary sources must be among answers, answers+prompts, got answers, bogus"),
    (["--vocab-sizes", "4,x"], "--vocab-sizes must be comma-separated integers, got '4,x'"),
    (["--threshold-range", "0.5,1.5"], r"threshold range must lie in (0, 1], got (0.5, 1.5)"),
    (["--add", "qa", "--remove", "math"], "--add and --remove are separate edits: give one"),
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


# --- per-domain draft configurations (issue 14) -------------------------------------------------------


def _config(fingerprint: str, vocab: tuple[int, ...] | None, int8: bool = False, threshold: float = 0.05,
            max_draft: int = 4, skip: SkipSet = SkipSet(), layers: int = 4, name: str = "") -> SkipProfile:
    return SkipProfile(SelfDraftSettings(skip, threshold=threshold, max_draft=max_draft, vocab_ids=vocab, int8=int8),
                       fingerprint, "m", layers, domain={"name": name, "vocab_source": "answers"})


def test_routing_picks_the_whole_configuration_and_radius_per_domain():
    rng = np.random.default_rng(1)
    centres = {name: np.eye(8)[i] for i, name in enumerate(["qa", "math", "code"])}
    vectors = _clusters(rng, centres, 12)
    configs = {"qa": _config("fp", (1, 2, 3), int8=True, threshold=0.6, max_draft=7, name="qa"),
               "math": _config("fp", tuple(range(10, 40)), threshold=0.9, max_draft=3, skip=SkipSet.of([1], [2])),
               "code": _config("fp", None, int8=True, max_draft=12)}
    anchors, labels, radii = [], [], {}
    for name, rows in vectors.items():
        block, _ = fit_anchors({name: rows}, anchors_per_category=3)
        anchors.append(block)
        labels += [name] * 3
        radii[name] = fallback_radius(block, rows)
    mixed = _config("fp", tuple(range(0, 60)), name=MIXED)
    bundle = ProfileBundle(np.concatenate(anchors), labels, configs, mixed, radii, "fp", "m")
    for category, queries in _clusters(rng, centres, 10).items():
        for query in queries:
            route = bundle.route(query)
            assert (route.category, route.profile, route.fallback) == (category, category, False)
            assert bundle.profile(route).settings == configs[category].settings  # skip, vocab, int8, threshold, max
    # the radius is the nearest domain's own: a query just beyond qa's radius falls back, even if math's is larger
    wide = {**radii, "math": 1.5}
    bundle = ProfileBundle(np.concatenate(anchors), labels, configs, mixed, wide, "fp", "m")
    far = bundle.route(np.eye(8)[6])
    assert far.fallback and bundle.profile(far) is mixed
    query = bundle.anchors[0] + 0.0
    query[7] = radii["qa"] * 1.5  # away from qa's anchor along an empty axis
    query /= np.linalg.norm(query)
    route = bundle.route(query)
    assert route.category == "qa" and route.distance > radii["qa"] and route.fallback


def test_vocabulary_carrying_profile_round_trips_and_old_profiles_still_load(tmp_path):
    target = tiny_model("qwen2")
    profile = _config(target.fingerprint, tuple(range(60, 3, -1)), int8=True, threshold=0.45, max_draft=9,
                      skip=SkipSet.of([2], [0, 3]), name="code")
    profile = SkipProfile(profile.settings, target.fingerprint, target.name, 4, {"space": {"vocab_sizes": [8, 57]}},
                          {"tau": 2.5}, {"name": "code", "vocab_source": "answers+prompts"})
    path = profile.save(tmp_path / "code.json")
    assert json.loads(path.read_text())["version"] == 2
    assert load_profile(path, target) == profile and path.read_text() == profile.to_text()
    legacy = json.loads(path.read_text())  # a version-1 file: no domain block
    legacy.pop("domain")
    legacy["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(legacy))
    old = load_profile(tmp_path / "v1.json", target)
    assert old.settings == profile.settings and old.domain == {}
    skip_only = {**legacy, "draft": {"threshold": 0.8, "max_draft": 12}}  # the oldest: no vocabulary, no int8
    (tmp_path / "skip.json").write_text(json.dumps(skip_only))
    assert load_profile(tmp_path / "skip.json", target).settings == SelfDraftSettings(SkipSet.of([2], [0, 3]))
    other = tiny_model("qwen2", seed=7)
    with pytest.raises(InvalidSettingError, match="was searched on model 'tiny-qwen2-0'.*not on 'tiny-qwen2-7'") as info:
        load_profile(path, other)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidSettingError, match="was searched on model") as info:
        SpeculativeDecoder(other, "ssd", profile=str(path))
    assert "\n" not in str(info.value)


def test_version_1_bundle_still_loads(synthetic, tmp_path):
    bundle, centres, rng = synthetic
    directory = tmp_path / "v1"
    (directory / "profiles").mkdir(parents=True)
    files = {}
    for name, profile in [*bundle.profiles.items(), (MIXED, bundle.mixed)]:
        files[name] = f"profiles/{name}.json"
        profile.save(directory / files[name])
    np.savez(directory / "anchors.npz", anchors=bundle.anchors)
    (directory / "bundle.json").write_text(json.dumps({
        "format": "specdecode-knn-bundle", "version": 1, "model": {"name": "m", "fingerprint": "fp"},
        "categories": bundle.categories, "labels": bundle.labels, "radius": bundle.radius, "anchors": "anchors.npz",
        "profiles": {c: files[c] for c in bundle.categories}, "mixed": files[MIXED], "settings": {}}))
    loaded = load_bundle(directory)
    assert loaded.revision == 0 and loaded.radii == bundle.radii
    for query in _clusters(rng, centres, 3)["code"]:
        assert loaded.route(query) == bundle.route(query)


def test_add_and_remove_keep_other_domains_byte_identical(synthetic, tmp_path):
    bundle, centres, rng = synthetic
    directory = bundle.save(tmp_path / "b")
    before = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    new_centre = np.eye(8)[4]
    rows = _clusters(rng, {"law": new_centre}, 12)["law"]
    anchors, _ = fit_anchors({"law": rows}, anchors_per_category=3)
    law = _config("fp", (5, 6, 7), int8=True, name="law")
    grown = replace_settings(bundle.mixed, vocab_ids=(1, 2, 5, 6, 7))
    added = load_bundle(bundle.with_domain("law", anchors, fallback_radius(anchors, rows), law, grown).save(directory))
    after = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    for name in ("qa", "math", "code"):
        for file in (f"anchors/{name}.npy", f"profiles/{name}.json"):
            assert after[Path(file)] == before[Path(file)], file
    assert added.revision == 2 and added.history[-1]["action"] == "add" and added.categories[-1] == "law"
    assert added.mixed.settings.vocab_ids == (1, 2, 5, 6, 7)
    assert added.route(_clusters(rng, {"law": new_centre}, 1)["law"][0]).profile == "law"
    for query in _clusters(rng, centres, 3)["math"]:
        assert added.route(query).profile == "math"
    removed = load_bundle(added.without_domain("law").save(directory))
    assert removed.revision == 3 and removed.categories == ["qa", "math", "code"]
    assert not (directory / "anchors" / "law.npy").exists() and not (directory / "profiles" / "law.json").exists()
    final = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    for file in [f for f in before if str(f).startswith(("anchors/", "profiles/")) and "mixed" not in str(f)]:
        assert final[file] == before[file]
    with pytest.raises(InvalidSettingError, match="bundle has no domain 'law'"):
        removed.without_domain("law")


def replace_settings(profile: SkipProfile, **changes) -> SkipProfile:
    from dataclasses import replace

    return replace(profile, settings=replace(profile.settings, **changes))


def _vocab_bundle(target, rng: random.Random) -> tuple[ProfileBundle, dict[str, list[list[int]]]]:
    """Two domains over disjoint token ranges, each configuration with its own random draft vocabulary
    (a random subset of the ids), int8 or not, its own threshold and maximum draft."""
    bundle, prompts = _tiny_bundle(target, rng)

    def config(name: str) -> SkipProfile:
        vocab = tuple(rng.sample(range(VOCAB), rng.randint(5, VOCAB - 10)))
        skip = SkipSet.of(rng.sample(range(4), rng.randint(0, 2)), rng.sample(range(4), rng.randint(0, 2)))
        return _config(target.fingerprint, vocab, int8=rng.random() < 0.5, threshold=rng.choice([0.02, 0.05, 0.2]),
                       max_draft=rng.randint(2, 8), skip=skip, name=name)

    radii = {c: r for c, r in bundle.radii.items()}
    mixed = config(MIXED)
    return ProfileBundle(bundle.anchors, bundle.labels, {c: config(c) for c in bundle.categories}, mixed, radii,
                         target.fingerprint, target.name), prompts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_knn_ssd_with_per_domain_vocabularies_equals_ar(arch, tmp_path):
    """float32 and float64 targets: whatever configuration routing picks, greedy output is ar's."""
    import torch

    for dtype in (torch.float64, torch.float32):
        target = tiny_model(arch, seed=2)
        target.model.to(dtype)
        rng = random.Random(f"vocab-{arch}-{dtype}")
        bundle, prompts = _vocab_bundle(target, rng)
        loaded = load_bundle(bundle.save(tmp_path / f"b-{dtype}".replace("torch.", "")))  # through the files
        ar = SpeculativeDecoder(target, "ar")
        knn = SpeculativeDecoder(target, "knn-ssd", bundle=loaded)
        used = set()
        for rows in prompts.values():
            for prompt in rows[:3]:
                result = knn.generate(prompt, max_new_tokens=24)
                assert result.token_ids == ar.generate(prompt, max_new_tokens=24).token_ids
                used.add(result.stats.extra["route"]["profile"])
        far = [VOCAB - 1] * 2  # also the mixed configuration, by force
        forced = ProfileBundle(loaded.anchors, loaded.labels, loaded.profiles, loaded.mixed, 1e-9,
                               loaded.fingerprint, loaded.model_name)
        result = SpeculativeDecoder(target, "knn-ssd", bundle=forced).generate(far, max_new_tokens=24)
        assert result.stats.extra["route"]["profile"] == MIXED
        assert result.token_ids == ar.generate(far, max_new_tokens=24).token_ids
        assert used - {MIXED}


def test_config_search_covers_the_space_resumes_and_stops_on_budget(tmp_path):
    from specdecode.search.calibration import calibrate
    from specdecode.search.config_search import DraftSpace, search_config
    from specdecode.search.objective import CostTable, SimulatedObjective

    target = tiny_model("llama", seed=3)
    calibration = calibrate(target, [[3, 4, 5, 6], [50, 51, 52]], 8)
    costs = CostTable(target, calibration.prompts[0] + calibration.continuations[0], max_draft=6, repeats=1)
    space = DraftSpace({"answers": list(range(VOCAB)), "answers+prompts": list(range(VOCAB - 1, -1, -1))},
                       vocab_sizes=(10, 40, 0), threshold=(0.05, 0.3), max_draft=(2, 6))
    calls = []

    class Counting(SimulatedObjective):
        def __call__(self, settings):
            calls.append(settings)
            return super().__call__(settings)

    objective = Counting(target, calibration, costs)
    checkpoint = tmp_path / "search.json"
    first = search_config(objective, 4, space, iterations=2, init_points=3, seed=1, checkpoint=checkpoint,
                          progress=False)
    assert len(first.history) == len(calls) == 5
    # two stages: the starts and half the iterations choose with nothing skipped, then the skip
    # flags are searched with the best choices fixed
    assert [e["stage"] for e in first.history] == ["choices"] * 4 + ["skips"]
    assert all(calls[i].skip == SkipSet() for i in range(4))
    best_choice = max(first.history[:4], key=lambda e: e["evaluation"]["score"])["point"][8:]
    assert first.history[4]["point"][8:] == best_choice and calls[4].skip != SkipSet()
    assert calls[0] == SelfDraftSettings(SkipSet(), threshold=0.3, max_draft=6, vocab_ids=tuple(range(40)), int8=True)
    for settings in calls:
        assert settings.vocab_ids is None or len(settings.vocab_ids) in (10, 40)
        assert 0.05 <= settings.threshold <= 0.3 and 2 <= settings.max_draft <= 6
    assert set(costs.formats) == {"int8" if s.int8 else "float" for s in calls}
    cost = costs.model_for(calls[0])
    assert cost.verify(3) >= cost.verify(2) >= cost.verify(1) > 0 and cost.draft(SkipSet()) >= cost.draft_fixed_s
    resumed = search_config(objective, 4, space, iterations=4, init_points=3, seed=1, checkpoint=checkpoint,
                            progress=False)
    assert len(calls) == 7 and resumed.history[:5] == first.history  # two more, the first five from the file
    budgeted = search_config(objective, 4, space, iterations=50, init_points=2, seed=2, budget_s=1e-6,
                             progress=False)
    assert len(budgeted.history) == 2 and budgeted.stopped_by == "budget"  # the starts, then the budget


def test_cli_add_remove_and_eval_with_an_unseen_domain(tmp_path, capsys):
    from specdecode.cli.main import main

    directory, _ = _tiny_model_dir(tmp_path)
    rng = random.Random(9)
    data = tmp_path / "knn.jsonl"
    ranges = {"qa": range(1, 30), "math": range(35, 65), "code": range(70, VOCAB), "chat": range(1, VOCAB)}
    counts = {"qa": 6, "math": 6, "code": 6, "chat": 3}
    data.write_text("\n".join(
        json.dumps({"category": c, "turns": [" ".join(f"w{rng.choice(ranges[c])}" for _ in range(8))]})
        for c, n in counts.items() for _ in range(n)))
    out = tmp_path / "bundle"
    common = ["--model", str(directory), "--data", str(data), "--prompts-per-category", "4", "--anchors", "2",
              "--search-prompts", "2", "--answer-tokens", "8", "--search-tokens", "6", "--iterations", "1",
              "--init-points", "2", "--vocab-sizes", "8,30", "--threshold-range", "0.05,0.2", "--max-draft-range",
              "2,5", "--no-progress", "--out", str(out)]
    assert main(["build-knn", *common, "--categories", "qa,math"]) == 0
    bundle = load_bundle(out)
    assert bundle.revision == 1 and bundle.categories == ["qa", "math"]
    for name, profile in bundle.profiles.items():
        assert profile.settings.vocab_ids is not None and len(profile.settings.vocab_ids) in (8, 30)
        assert profile.domain["name"] == name and profile.search["space"]["vocab_sizes"] == [8, 30]
    assert set(bundle.mixed.settings.vocab_ids) == set().union(*(p.settings.vocab_ids for p in bundle.profiles.values()))
    files = {p.relative_to(out): p.read_bytes() for p in (out / "anchors").iterdir()}
    files.update({p.relative_to(out): p.read_bytes() for p in (out / "profiles").iterdir() if p.stem != MIXED})
    capsys.readouterr()

    assert main(["build-knn", *common, "--add", "code"]) == 0
    added = load_bundle(out)
    assert added.categories == ["qa", "math", "code"] and added.revision == 2
    assert all((out / file).read_bytes() == content for file, content in files.items())
    assert set(added.profiles["code"].settings.vocab_ids) <= set(added.mixed.settings.vocab_ids)
    assert added.history[-1]["action"] == "add" and "added 'code'" in capsys.readouterr().err
    assert main(["build-knn", *common, "--add", "code"]) == 2
    assert "bundle already has domain 'code'" in capsys.readouterr().err

    assert main(["build-knn", "--out", str(out), "--remove", "math"]) == 0
    removed = load_bundle(out)
    assert removed.categories == ["qa", "code"] and removed.revision == 3
    assert not (out / "anchors" / "math.npy").exists()
    assert (out / "anchors" / "qa.npy").read_bytes() == files[Path("anchors/qa.npy")]
    capsys.readouterr()

    report = tmp_path / "eval"
    evaluate = ["knn-eval", "--bundle", str(out), "--data", str(data), "--model", str(directory), "--per-category",
                "2", "--prompt-offset", "4", "--unseen", "chat", "--max-new-tokens", "6", "--warmup", "0",
                "--no-progress", "--out", str(report)]
    assert main(evaluate) == 0
    summary = json.loads((report / "knn.json").read_text())
    assert summary["unseen_domains"] == ["chat"] and summary["routing"]["chat"]["unseen"]
    assert summary["routing"]["bundle domains"]["requests"] == 4 and "unseen" in summary["headline"]
    assert sorted(summary["stream"]) == ["chat-0", "chat-1", "code-4", "code-5", "qa-4", "qa-5"]
    assert all(m["identical"] == m["prompts"] == 6 for m in summary["methods"].values())
    assert set(summary["domain_matrix"]["ssd[qa]"]) == {"qa", "code", "chat"}
    assert (report / "tsne.png").stat().st_size > 0 and (report / "domain_matrix.png").stat().st_size > 0
    check = json.loads((report / "routing.json").read_text())  # every held-out prompt, routed by embedding
    assert check["per_domain"]["qa"]["prompts"] == 2 and check["per_domain"]["chat"] == {
        **check["per_domain"]["chat"], "prompts": 3, "unseen": True}
    assert "Routing of every held-out prompt" in (report / "knn.md").read_text()
    assert "(not in the bundle)" in (report / "knn.md").read_text()
    records = (report / "records.jsonl").read_text()
    assert len(list((report / "checkpoints").glob("request-*.pkl"))) == 6
    assert main(evaluate) == 0  # resumes: every request comes from its checkpoint
    assert (report / "records.jsonl").read_text() == records



def test_shipped_bundle_loads_and_stays_small():
    """The bundle shipped for the embedded model validates without the model and stays under 1 MB."""
    from specdecode.models.loading import shipped_bundle_dir

    directory = shipped_bundle_dir()
    bundle = load_bundle(directory)
    assert len(bundle.categories) >= 5 and bundle.mixed.settings.vocab_ids is not None
    for profile in bundle.profiles.values():
        assert set(profile.settings.vocab_ids or ()) <= set(bundle.mixed.settings.vocab_ids)
    assert sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) < 1_000_000


def test_cli_build_resumes_after_an_interruption(tmp_path, capsys):
    """Finished domains come back from their checkpoints; an interrupted one resumes its search."""
    from specdecode.cli.main import main

    directory, _ = _tiny_model_dir(tmp_path)
    rng = random.Random(11)
    data = tmp_path / "knn.jsonl"
    data.write_text("\n".join(json.dumps({"category": c, "turns": [" ".join(f"w{rng.randrange(1, VOCAB)}"
                                                                            for _ in range(8))]})
                              for c in ("qa", "math") for _ in range(4)))
    out = tmp_path / "bundle"
    build = ["build-knn", "--model", str(directory), "--data", str(data), "--prompts-per-category", "4",
             "--anchors", "2", "--search-prompts", "2", "--answer-tokens", "6", "--search-tokens", "6",
             "--iterations", "2", "--init-points", "2", "--vocab-sizes", "8,30", "--out", str(out)]
    assert main(build) == 0
    first = {p.name: p.read_bytes() for p in (out / "profiles").iterdir()}
    capsys.readouterr()
    (out / "bundle.json").unlink()  # as if killed before the end: math finished, qa's search too,
    (out / "checkpoints" / "math.domain.json").unlink()  # but math's domain was not written yet
    assert main([*build, "--budget", "500"]) == 0  # a resume may change the budget
    err = capsys.readouterr().err
    assert "qa: finished in an earlier run (checkpoint)" in err
    assert "math: ar answers of 4 build prompts reused from the checkpoint" in err
    assert "math search: 100%" in err and "0/4" not in err.split("math search")[1][:40]  # resumed at 4/4
    assert {p.name: p.read_bytes() for p in (out / "profiles").iterdir()}.keys() == first.keys()
    assert (out / "profiles" / "qa.json").read_bytes() == first["qa.json"]
    assert load_bundle(out).profiles["math"].settings == SkipProfile.from_dict(
        json.loads(first["math.json"])).settings
