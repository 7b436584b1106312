"""KNN-SSD routing, offline: the bundle builder (:mod:`specdecode.routing.build`). The bundle format
and the online nearest-anchor lookup live in :mod:`specdecode.artifacts.bundle`; the mixed-stream
evaluation is a benchmark (:mod:`specdecode.bench.knn_eval`)."""
