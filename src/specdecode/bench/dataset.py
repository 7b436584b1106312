"""Spec-Bench prompt sets: JSONL with ``question_id``, ``category`` and ``turns``.

Only the first turn of each question is used (the benchmark times single-turn generation). The
eight MT-bench categories are reported together as one ``mt_bench`` column, as Spec-Bench does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specdecode.errors import InvalidSettingError, SpecDecodeError

MT_BENCH = "mt_bench"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Spec-Bench's column order; unknown categories from other files follow in file order.
TASK_ORDER = (MT_BENCH, "translation", "summarization", "qa", "math_reasoning", "rag")

# The embedded Gemma 3 270M has no chat template, so every turn is framed the same plain way (the
# USER/ASSISTANT framing of Spec-Bench's Vicuna template, which this base model continues as an
# answer; "Question/Answer" framing made it loop on "Answer:" for summaries). The same token ids
# then go to every method and every `transformers` peer.
DEFAULT_TEMPLATE = "User: {turn}\nAssistant:"


class DatasetError(SpecDecodeError):
    """A prompt file that cannot be read, or a filter that matches nothing in it."""


@dataclass(frozen=True)
class BenchPrompt:
    question_id: int | str
    category: str
    turn: str

    @property
    def task(self) -> str:
        """The table column this prompt counts towards."""
        return task_of(self.category)


def task_of(category: str) -> str:
    return MT_BENCH if category in MT_BENCH_CATEGORIES else category


def order_tasks(tasks: set[str] | list[str]) -> list[str]:
    known = [t for t in TASK_ORDER if t in tasks]
    return known + sorted(set(tasks) - set(TASK_ORDER))


def format_prompt(prompt: BenchPrompt, template: str = DEFAULT_TEMPLATE) -> str:
    check_template(template)
    return template.replace("{turn}", prompt.turn)


def check_template(template: str) -> None:
    if "{turn}" not in template:
        raise InvalidSettingError(f"prompt template {template!r} must contain {{turn}}")


def read_prompts(path: str | Path) -> list[BenchPrompt]:
    """Every question in ``path``; a malformed line is reported with its line number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 and kin may sit inside a JSON string
    except FileNotFoundError:
        raise DatasetError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read prompt file {path}: {exc}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_parse_line(line, f"{path}:{number}"))
    if not prompts:
        raise DatasetError(f"prompt file {path} has no questions")
    return prompts


def _parse_line(line: str, where: str) -> BenchPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("question_id", "category", "turns") if key not in row]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    category, turns = row["category"], row["turns"]
    if not isinstance(category, str) or not category:
        raise DatasetError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
        raise DatasetError(f"{where}: 'turns' must be a list whose first item is a non-empty string")
    return BenchPrompt(question_id=row["question_id"], category=category, turn=turns[0])


def select_prompts(
    prompts: list[BenchPrompt], categories: list[str] | None = None, per_category: int | None = None
) -> list[BenchPrompt]:
    """Keep the given categories (``mt_bench`` stands for all eight MT-bench ones), at most
    ``per_category`` questions of each category, in file order."""
    if per_category is not None and per_category < 1:
        raise InvalidSettingError(f"per-category count must be >= 1, got {per_category}")
    present = list(dict.fromkeys(p.category for p in prompts))
    wanted = set(present)
    if categories:
        wanted = set()
        for name in categories:
            if name == MT_BENCH:
                expanded = [c for c in present if task_of(c) == MT_BENCH]
            else:
                expanded = [name] if name in present else []
            if not expanded:
                raise DatasetError(f"unknown category {name!r}; the prompt file has: {', '.join(present)}")
            wanted.update(expanded)
    taken: dict[str, int] = {}
    selected = []
    for prompt in prompts:
        if prompt.category in wanted and (per_category is None or taken.get(prompt.category, 0) < per_category):
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            selected.append(prompt)
    return selected


def load_prompts(
    path: str | Path, categories: list[str] | None = None, per_category: int | None = None
) -> list[BenchPrompt]:
    """Read ``path`` and select from it (see :func:`select_prompts`)."""
    return select_prompts(read_prompts(path), categories, per_category)


def split_holdout(prompts: list[BenchPrompt], holdout: int) -> tuple[list[BenchPrompt], list[BenchPrompt]]:
    """(training, held-out): the first ``holdout`` prompts of every category are held out, the rest train."""
    held = select_prompts(prompts, per_category=holdout) if holdout else []
    return [p for p in prompts if p not in held], held


def held_out_per_category(held: list[BenchPrompt], per_category: int) -> list[BenchPrompt]:
    """The first ``per_category`` held-out prompts of every task, in order."""
    seen: dict[str, int] = {}
    chosen = []
    for prompt in held:
        seen[prompt.task] = seen.get(prompt.task, 0) + 1
        if seen[prompt.task] <= per_category:
            chosen.append(prompt)
    return chosen
