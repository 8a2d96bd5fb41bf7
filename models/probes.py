"""Linear probes: is an object's presence readable from the image tokens the language model receives?

For each category, a logistic regression (scikit-learn, classes weighted to balance) predicts "the category is in
the image" from one feature vector per image: the mean and the max over its image tokens at one site (the language
model's input, or a grounded layer's image-key features; :func:`models.diagnostics.forced_pass`). Its out-of-fold
decision values are scored with :func:`models.diagnostics.auroc`. Folds are stratified by label and grouped by
image (:func:`probe_folds`): no image is ever on both sides of a split, also where the evaluation lists an image
more than once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.diagnostics import auroc

__all__ = ["category_probes", "companion_probes", "probe_auroc", "probe_folds"]


def probe_folds(labels: np.ndarray, groups: Sequence[Any], folds: int,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) of stratified folds that keep every group (image) on one side.

    Fewer folds where a class has fewer images than ``folds``; none where a class has fewer than 2.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels, dtype=bool)
    groups = np.asarray([str(g) for g in groups])
    n_pos, n_neg = len(set(groups[labels])), len(set(groups[~labels]))
    splits = min(folds, n_pos, n_neg)
    if splits < 2:
        return []
    kfold = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    return list(kfold.split(np.zeros(len(labels)), labels, groups))


def probe_auroc(features: np.ndarray, labels: np.ndarray, groups: Sequence[Any], folds: int = 5,
                seed: int = 0) -> float | None:
    """AUROC of out-of-fold logistic-regression scores (standardised features, balanced class weights)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    scores = np.full(len(labels), np.nan)
    for train, test in probe_folds(labels, groups, folds, seed):
        if labels[train].all() or not labels[train].any():
            continue  # a training side with one class cannot fit (its test rows stay unscored)
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        model.fit(features[train], labels[train])
        scores[test] = model.decision_function(features[test])
    return auroc(scores, labels)


def category_probes(features: Mapping[str, np.ndarray], image_ids: Sequence[Any],
                    presence: Mapping[Any, frozenset[str]], categories: Sequence[str], folds: int = 5,
                    seed: int = 0) -> dict[str, dict]:
    """Per category: images with / without it and the probe AUROC at every feature site (None: too few images)."""
    out = {}
    for category in categories:
        labels = np.array([category in presence.get(i, ()) for i in image_ids], dtype=bool)
        out[category] = {
            "n_present": int(labels.sum()),
            "n_absent": int((~labels).sum()),
            "auroc": {site: probe_auroc(x, labels, image_ids, folds, seed) for site, x in features.items()},
        }
    return out


def companion_probes(features: Mapping[str, np.ndarray], image_ids: Sequence[Any],
                     presence: Mapping[Any, frozenset[str]], pairs: Sequence[tuple[str, str]], folds: int = 5,
                     seed: int = 0) -> dict[str, dict]:
    """Per (anchor, companion) bias: among the images that show the anchor, is the companion there? The companion's
    own evidence, without the anchor's co-occurrence to lean on."""
    out = {}
    for anchor, companion in pairs:
        rows = np.array([anchor in presence.get(i, ()) for i in image_ids], dtype=bool)
        ids = [i for i, keep in zip(image_ids, rows) if keep]
        labels = np.array([companion in presence.get(i, ()) for i in ids], dtype=bool)
        out[f"{anchor}->{companion}"] = {
            "n_present": int(labels.sum()),
            "n_absent": int((~labels).sum()),
            "auroc": {site: probe_auroc(x[rows], labels, ids, folds, seed) for site, x in features.items()},
        }
    return out
