"""MTAD's verification: accept the longest draft prefix whose joint target/draft ratio clears τ.

r_i = Σ_{j≤i} (log p(x_j|·) − log q(x_j|·)); accept a = max{i : r_i > log τ} (0 if none), then
sample one token from the target at position a + 1. Note "longest", not "until the first
failure": the cumulative ratio can recover after a dip. With a greedy (one-hot) target, a
mismatch makes r = −∞ from there on, so greedy MTAD keeps exactly the prefix greedy decoding
would produce.
"""

from __future__ import annotations

import math

import torch

from specdecode.accept.rules import Verdict
from specdecode.errors import InvalidSettingError
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits, sample


class JointRatioAcceptance:
    reads_until_mismatch = False  # the longest passing prefix may extend past a failing position

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None, threshold: float = 0.5) -> None:
        if not threshold > 0:
            raise InvalidSettingError(f"threshold (acceptance threshold tau) must be > 0, got {threshold}")
        self.sampling, self.generator, self.log_threshold = sampling, generator, math.log(threshold)

    def __call__(self, draft: Draft, target_logits: torch.Tensor) -> Verdict:
        p = process_logits(target_logits, self.sampling)
        accepted = 0
        if len(draft):
            if draft.log_q is None:
                raise InvalidSettingError("joint-ratio acceptance needs the draft's log-probabilities")
            k = len(draft)
            log_p = torch.log(p[torch.arange(k), torch.tensor(draft.tokens)])
            ratio = torch.cumsum(log_p - draft.log_q.to(log_p), dim=0)
            passing = (ratio > self.log_threshold).nonzero()
            accepted = int(passing[-1]) + 1 if len(passing) else 0
        next_token = int(p[accepted].argmax()) if self.sampling.greedy else sample(p[accepted], self.generator)
        return Verdict(accepted, next_token)


class AcceptAll:
    """Keep the whole draft (it already came from the target's own distribution: MTJD), then one
    token sampled from the target's conditional after it."""

    reads_until_mismatch = False

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None) -> None:
        self.sampling, self.generator = sampling, generator

    def __call__(self, draft: Draft, target_logits: torch.Tensor) -> Verdict:
        p = process_logits(target_logits[len(draft)], self.sampling)
        return Verdict(len(draft), sample(p, self.generator))
