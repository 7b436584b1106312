"""Draft distillation: the loop learns, the result loads as a draft, and a bad vocabulary map is refused."""

from __future__ import annotations

import json

import pytest
import torch

from specdecode.api import SpeculativeDecoder
from specdecode.distill.student import build_student
from specdecode.distill.teacher import collect_teacher_data
from specdecode.distill.train import TrainSettings, train_draft
from specdecode.errors import InvalidSettingError, VocabularyMismatchError
from specdecode.models.loading import LoadedModel, load_model, pair_draft
from specdecode.models.vocab_map import VOCAB_MAP_FILE, VocabMap, apply_vocab_map, pair_target_embedding
from tiny_models import VOCAB, tiny_model

KEPT = list(range(0, VOCAB, 2))  # the draft's reduced vocabulary: every other id


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model("gemma3", layers=4)


@pytest.fixture(scope="module")
def teacher(target, tmp_path_factory):
    prompts = [torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(6)]
    return collect_teacher_data(target, prompts, tmp_path_factory.mktemp("teacher"), max_new_tokens=10,
                                top_k=8, batch_size=3, progress=False)


def _saved_draft(target, tmp_path, layers=(0, 3), reads_target_embedding=True):
    student, vocab_map = build_student(target, list(layers), KEPT, reads_target_embedding)
    student.save_pretrained(tmp_path)
    vocab_map.save(tmp_path)
    return tmp_path


def test_student_with_every_layer_and_full_vocabulary_is_the_target(target):
    student, vocab_map = build_student(target, [0, 1, 2, 3], list(range(VOCAB)))
    apply_vocab_map(student.double(), vocab_map)
    pair_target_embedding(student, target.model)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = target.model(input_ids=ids).logits
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)  # the student is built in float32


def test_training_reduces_the_distillation_loss(target, teacher):
    assert teacher and all(len(s.top_ids) == len(s.ids) - 1 for s in teacher)
    student, vocab_map = build_student(target, [0, 3], KEPT)
    log = train_draft(student, vocab_map, teacher, TrainSettings(steps=40, batch_size=4, lr=3e-3, warmup=2),
                      progress=False, target_embedding=target.model.get_input_embeddings())
    first, last = sum(log.losses[:5]) / 5, sum(log.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_training_resumes_from_its_checkpoint(target, teacher, tmp_path):
    settings = TrainSettings(steps=6, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=3)
    straight, vocab_map = build_student(target, [0, 3], KEPT, reads_target_embedding=False)
    train_draft(straight, vocab_map, teacher, settings, progress=False)
    resumed, _ = build_student(target, [0, 3], KEPT, reads_target_embedding=False)
    train_draft(resumed, vocab_map, teacher, settings, checkpoint=tmp_path / "ckpt.pt", progress=False, stop_at=4)
    resumed, _ = build_student(target, [0, 3], KEPT, reads_target_embedding=False)  # a fresh process
    train_draft(resumed, vocab_map, teacher, settings, checkpoint=tmp_path / "ckpt.pt", progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_checkpoint_of_another_run_is_refused(target, teacher, tmp_path):
    settings = TrainSettings(steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2)
    student, vocab_map = build_student(target, [0, 3], KEPT, reads_target_embedding=False)
    train_draft(student, vocab_map, teacher, settings, checkpoint=tmp_path / "ckpt.pt", progress=False, stop_at=2)
    other, _ = build_student(target, [0, 3], KEPT, reads_target_embedding=False)
    with pytest.raises(InvalidSettingError, match="other settings"):
        train_draft(other, vocab_map, teacher, TrainSettings(steps=8, batch_size=2, lr=1e-3, warmup=1),
                    checkpoint=tmp_path / "ckpt.pt", progress=False)
    deeper, deeper_map = build_student(target, [0, 1, 3], KEPT, reads_target_embedding=False)
    with pytest.raises(InvalidSettingError, match="student"):
        train_draft(deeper, deeper_map, teacher, settings, checkpoint=tmp_path / "ckpt.pt", progress=False)


def test_saved_draft_loads_in_target_ids_and_sps_stays_lossless(target, tmp_path):
    draft = load_model(_saved_draft(target, tmp_path))
    assert draft.vocab_size == target.vocab_size
    pair_draft(target, draft)
    logits = draft.model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1]
    assert torch.isinf(logits[1::2]).all() and torch.isfinite(logits[0::2]).all()  # odd ids are outside the draft
    prompt = [5, 9, 11, 3, 7]
    ar = SpeculativeDecoder(target, "ar").generate(prompt, max_new_tokens=20, stop_at_eos=False)
    sps = SpeculativeDecoder(target, "sps", draft).generate(prompt, max_new_tokens=20, stop_at_eos=False)
    assert sps.token_ids == ar.token_ids


@pytest.mark.parametrize("corrupt", [
    lambda m: {**m, "target_ids": m["target_ids"][:-1]},  # fewer ids than the draft has rows
    lambda m: {**m, "target_ids": [0] + m["target_ids"][1:-1] + [0]},  # repeated id
    lambda m: {**m, "target_ids": m["target_ids"][:-1] + [VOCAB + 5]},  # outside the target's vocabulary
    lambda m: {**m, "format": "something-else/9"},
    lambda m: {**m, "input": "elsewhere"},
])
def test_inconsistent_vocabulary_map_is_refused(target, tmp_path, corrupt):
    path = _saved_draft(target, tmp_path) / VOCAB_MAP_FILE
    path.write_text(json.dumps(corrupt(json.loads(path.read_text()))))
    with pytest.raises(VocabularyMismatchError, match="vocabulary map"):
        load_model(path.parent)


def test_draft_reads_tokens_outside_its_subset_through_the_target_embedding(target, tmp_path):
    own = load_model(_saved_draft(target, tmp_path / "own", reads_target_embedding=False))
    borrowing = load_model(_saved_draft(target, tmp_path / "borrowing"))
    outside = torch.tensor([[2, 4, 1]]), torch.tensor([[2, 4, 3]])  # 1 and 3 are not in the draft's subset
    with pytest.raises(VocabularyMismatchError, match="pair it with its target"):
        borrowing.model(input_ids=outside[0])
    pair_draft(target, borrowing)
    with torch.no_grad():
        assert torch.equal(*(own.model(input_ids=ids).logits[0, -1] for ids in outside))  # both read as "unknown"
        assert not torch.equal(*(borrowing.model(input_ids=ids).logits[0, -1] for ids in outside))
    before = target.model.get_input_embeddings().weight.dtype
    borrowing.model.to(torch.bfloat16)  # lent, not owned: the draft's casts leave the target alone
    assert target.model.get_input_embeddings().weight.dtype == before


@pytest.mark.parametrize("train_head", [False, True])
def test_head_rows_stay_the_targets_unless_asked_to_train(target, teacher, train_head):
    student, vocab_map = build_student(target, [0, 3], KEPT)
    before = student.get_output_embeddings().weight.detach().clone()
    train_draft(student, vocab_map, teacher, TrainSettings(steps=3, batch_size=2, lr=1e-3, warmup=1,
                                                           train_head=train_head),
                progress=False, target_embedding=target.model.get_input_embeddings())
    assert torch.equal(student.get_output_embeddings().weight, before) != train_head


def test_student_reading_the_target_embedding_needs_it_to_train(target, teacher):
    student, vocab_map = build_student(target, [0], KEPT)
    with pytest.raises(InvalidSettingError, match="target_embedding"):
        train_draft(student, vocab_map, teacher, TrainSettings(steps=1), progress=False)


def test_draft_for_another_vocabulary_or_tokenizer_is_refused(target, tmp_path):
    draft = load_model(_saved_draft(target, tmp_path))
    bigger = tiny_model("gemma3", vocab=VOCAB + 3)
    with pytest.raises(VocabularyMismatchError, match="vocabulary size"):
        pair_draft(bigger, draft)
    mapped = draft.model.get_output_embeddings().vocab_map
    draft.model.get_output_embeddings().vocab_map = VocabMap(mapped.target_ids, mapped.target_vocab_size, "0" * 16,
                                                             mapped.reads_target_embedding)

    class Tokenizer:
        def get_vocab(self):
            return {f"t{i}": i for i in range(VOCAB)}

    with pytest.raises(VocabularyMismatchError, match="another tokenizer"):
        pair_draft(LoadedModel(target.model, Tokenizer(), "t"), draft)


def test_bad_student_and_training_settings(target, teacher):
    with pytest.raises(InvalidSettingError, match="layers"):
        build_student(target, [0, 9], KEPT)
    with pytest.raises(VocabularyMismatchError, match="repeats"):
        build_student(target, [0], [1, 1, 2])
    student, vocab_map = build_student(target, [0], KEPT)
    with pytest.raises(InvalidSettingError, match="steps"):
        train_draft(student, vocab_map, teacher, TrainSettings(steps=0))
    with pytest.raises(InvalidSettingError, match="no teacher"):
        train_draft(student, vocab_map, [], TrainSettings())


def test_mtad_drafts_with_a_reduced_vocabulary_draft(target, tmp_path):
    draft = load_model(_saved_draft(target, tmp_path))
    decoder = SpeculativeDecoder(target, "mtad", draft)
    runs = [decoder.generate([5, 9, 11], max_new_tokens=12, temperature=1.0, top_k=10, seed=3, stop_at_eos=False)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 12
    assert runs[0].stats.draft_forwards > 0


@pytest.mark.parametrize("extra, message", [
    (["--layers", "a,b"], "--layers"),
    (["--holdout", "5"], "no training prompts"),
    (["--max-sequences", "0"], "--max-sequences"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    from specdecode.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"q{i}"]}) for i in range(3)))
    assert main(["distill-draft", "--out", str(tmp_path / "out"), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "out").exists()


def test_transformers_assisted_generation_accepts_the_reduced_vocabulary_draft(target, tmp_path):
    draft = load_model(_saved_draft(target, tmp_path))
    pair_draft(target, draft)
    prompt = torch.tensor([[5, 9, 11, 3]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    plain = target.model.generate(prompt, **kwargs)
    assisted = target.model.generate(prompt, assistant_model=draft.model, **kwargs)
    assert assisted.tolist() == plain.tolist()
