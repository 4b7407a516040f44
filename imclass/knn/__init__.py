"""Nearest neighbour and k-NN classifiers on raw pixels (the course's first classifier), exact and fast.

``KNN`` (alias ``NearestNeighbor``) reproduces scikit-learn's brute-force ``KNeighborsClassifier``, ties
included; ``choose_k`` picks k on held-out training data (validation split or k-fold cross-validation);
``neighbour_grid`` draws the lecture's picture. The distance kernels live in private modules:
``_knn_kernels``/``_knn_numba`` (numba, AVX2), ``_knn_int8`` (oneDNN int8 GEMM), ``_knn_pruned`` (exact L2
search of images skipping most distances by pooled lower bounds) and ``_select`` (which exact L2 kernel is
fastest on this host for a problem's shape, and when pruning pays). See docs/knn.md.
"""
from __future__ import annotations

from imclass.knn.estimator import KNN, METRICS, KSelection, NearestNeighbor, choose_k, neighbour_grid

__all__ = ["KNN", "METRICS", "KSelection", "NearestNeighbor", "choose_k", "neighbour_grid"]
