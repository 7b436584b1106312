"""Offline search for self-draft skip sets (Bayesian optimisation), and the profiles it writes."""

from specdecode.search.profile import SkipProfile, load_profile, self_draft_settings

__all__ = ["SkipProfile", "load_profile", "self_draft_settings"]
