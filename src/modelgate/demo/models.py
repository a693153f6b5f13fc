"""The demo's real models: three classifiers trained on scikit-learn's bundled digits data
(no download), and the held-out rows the demo sends as traffic, with their true labels."""

from __future__ import annotations

import itertools
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

    def write_traffic(self, path: Path, seed: int = 13) -> list[tuple[str, int]]:
        """One JSON line per request: a held-out row and the user sending it. Users come back
        as on a real site (most send 1-3 requests, a few dozens; the visits interleave), so
        the A/B result must be computed over users. Returns each line's (user, row); the
        bench sends line `seq % len(lines)` as request `seq`."""
        rng = np.random.default_rng(seed)
        users: list[str] = []
        for number in itertools.count():
            if len(users) >= len(self.features):
                break
            users += [f"user-{number}"] * _visits(rng)
        users = users[: len(self.features)]
        rng.shuffle(users)
        lines = [(user, row) for row, user in enumerate(users)]
        with open(path, "wb") as out:
            for user, row in lines:
                out.write(
                    b'{"user":"%s","features":[%s]}\n'
                    % (user.encode(), b",".join(b"%g" % v for v in self.features[row]))
                )
        return lines


def _visits(rng: np.random.Generator, cap: int = 40) -> int:
    """Requests of one user, heavy-tailed: P(1) = 0.45, then ever rarer, up to `cap`."""
    n = 1
    while rng.random() < 0.55 and n < cap:
        n = n * 2 if rng.random() < 0.3 else n + 1
    return n


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
