"""KNN-SSD routing, offline: the bundle builder (:mod:`specdecode.routing.build`) and the
mixed-stream evaluation (:mod:`specdecode.routing.evaluate`). The bundle format and the online
nearest-anchor lookup live in :mod:`specdecode.artifacts.bundle`."""
