"""KNN-SSD routing: profile bundles (anchors + per-category skip profiles), their builder
(:mod:`specdecode.routing.build`) and the mixed-stream evaluation (:mod:`specdecode.routing.evaluate`).

Only the bundle is imported here: the method registry needs it, and the builder and evaluation
import the registry in turn.
"""

from specdecode.routing.bundle import ProfileBundle, Route, load_bundle

__all__ = ["ProfileBundle", "Route", "load_bundle"]
