"""File formats the runtime reads: skip profiles (:mod:`.profile`) and KNN-SSD bundles (:mod:`.bundle`).

The offline tools that write them (``search/``, ``routing/``) sit above; this package imports
none of them, and nothing beyond torch and numpy, so that decoding never loads a builder.
"""
