"""The demo's real models: three classifiers trained on scikit-learn's bundled digits data
(no download), and the held-out rows the demo sends as traffic, with their true labels."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoModels", "train_models"]

# name -> (what it is, the estimator factory's keyword arguments)
MODEL_NAMES = ("model-v1", "model-v2", "model-v3")


@dataclass
class DemoModels:
    estimators: dict[str, Any]  # name -> fitted estimator
    accuracy: dict[str, float]  # on the held-out rows
    features: np.ndarray  # held-out rows, the traffic
    labels: np.ndarray  # their true digits
    description: dict[str, str]

    def save(self, directory: Path) -> dict[str, Path]:
        """Pickles each model for `modelgate mock-model --model FILE`."""
        paths = {}
        for name, estimator in self.estimators.items():
            path = directory / f"{name}.pkl"
            path.write_bytes(pickle.dumps(estimator))
            paths[name] = path
        return paths

    def write_traffic(self, path: Path) -> int:
        """One JSON line per held-out row; `user` is the unit id, so a row always lands on
        the same variant and its outcome can be judged from its true label."""
        with open(path, "wb") as out:
            for index, row in enumerate(self.features):
                out.write(
                    b'{"user":"row-%d","features":[%s]}\n'
                    % (index, b",".join(b"%g" % v for v in row))
                )
        return len(self.features)


def train_models(seed: int = 0) -> DemoModels:
    """v1: a heavily regularized logistic regression (the running model); v2: a better
    regularized one (the candidate); v3: a random forest (the shadow)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.ensemble import RandomForestClassifier  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.4, random_state=seed, stratify=labels
    )
    estimators = {
        "model-v1": LogisticRegression(C=0.0003, max_iter=300),
        "model-v2": LogisticRegression(C=0.01, max_iter=1000),
        "model-v3": RandomForestClassifier(n_estimators=40, random_state=seed),
    }
    for estimator in estimators.values():
        estimator.fit(x_train, y_train)
    accuracy = {
        name: float((estimator.predict(x_test) == y_test).mean())
        for name, estimator in estimators.items()
    }
    return DemoModels(
        estimators=estimators,
        accuracy=accuracy,
        features=x_test,
        labels=y_test,
        description={
            "model-v1": "logistic regression, C=0.0003 (running)",
            "model-v2": "logistic regression, C=0.01 (candidate)",
            "model-v3": "random forest, 40 trees (shadow)",
        },
    )
