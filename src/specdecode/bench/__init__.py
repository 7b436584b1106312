"""Benchmarking: every method and the `transformers` peers on the same prompts in one run.

>>> from specdecode import load_model                                               # doctest: +SKIP
>>> from specdecode.bench import BenchConfig, load_prompts, run_bench, write_report  # doctest: +SKIP
>>> prompts = load_prompts("specbench_dev.jsonl", ["qa", "rag"], per_category=5)     # doctest: +SKIP
>>> result = run_bench(load_model("default"), prompts, ["ar", "pld:gamma=10"], ["hf", "hf-pld"],
...                    config=BenchConfig(max_new_tokens=64))                         # doctest: +SKIP
>>> write_report(result, "runs/bench")                                               # doctest: +SKIP
"""

from specdecode.bench.contenders import ContenderSpec, parse_spec
from specdecode.bench.dataset import BenchPrompt, DatasetError, load_prompts
from specdecode.bench.peers import peer_names
from specdecode.bench.report import render_table, summarize, summary_lines, write_report
from specdecode.bench.record import Record
from specdecode.bench.runner import BenchConfig, BenchResult, run_bench

__all__ = [
    "BenchConfig", "BenchPrompt", "BenchResult", "ContenderSpec", "DatasetError", "Record", "load_prompts",
    "parse_spec", "peer_names", "render_table", "run_bench", "summarize", "summary_lines", "write_report",
]
