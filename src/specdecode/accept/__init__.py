"""Acceptance rules: given a draft and the target's logits over it, decide what to keep."""

from specdecode.accept.rules import AcceptanceRule, GreedyMatch, SpeculativeSampling, Verdict

__all__ = ["AcceptanceRule", "GreedyMatch", "SpeculativeSampling", "Verdict"]
