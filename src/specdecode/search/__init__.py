"""Offline search for self-draft skip sets (Bayesian optimisation); the profiles it writes are
read by :mod:`specdecode.artifacts.profile`."""
