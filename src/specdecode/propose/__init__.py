"""Drafters (proposers): each returns draft tokens plus what the acceptance rule needs."""

from specdecode.propose.base import Draft, DraftStats, Proposer
from specdecode.propose.draft_model import DraftLengthSchedule, DraftModelProposer
from specdecode.propose.ngram import NgramProposer

__all__ = ["Draft", "DraftLengthSchedule", "DraftModelProposer", "DraftStats", "NgramProposer", "Proposer"]
