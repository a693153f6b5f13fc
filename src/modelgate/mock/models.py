"""Real models behind `modelgate mock-model --model FILE`: a pickled scikit-learn classifier
answering `{"features": [...]}` (or `{"instances": [[...], ...]}`) with its prediction.

The answer has the mock's shape, so shadows compare it the same way: `label` (the predicted
class), `probs` (class probabilities), `score` (the top probability) and `model`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import orjson

__all__ = ["ModelError", "SklearnPredictor", "load_predictor"]


class ModelError(Exception):
    """A request the model cannot answer (bad features): the server answers 400."""


class SklearnPredictor:
    """Wraps a fitted estimator with `predict_proba`; called once per request."""

    def __init__(self, estimator: Any, name: str) -> None:
        if not hasattr(estimator, "predict_proba"):
            raise TypeError(f"{type(estimator).__name__} has no predict_proba")
        self.estimator = estimator
        self.name = name
        self.n_features = int(getattr(estimator, "n_features_in_", 0)) or None
        self.classes = [c.item() if hasattr(c, "item") else c for c in estimator.classes_]

    def __call__(self, body: bytes) -> dict[str, Any]:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"body is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ModelError('expected {"features": [...]} or {"instances": [[...]]}')
        single = "features" in document
        rows = [document["features"]] if single else document.get("instances")
        try:
            matrix = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"features must be numbers: {exc}") from exc
        if matrix.ndim != 2 or (self.n_features and matrix.shape[1] != self.n_features):
            raise ModelError(f"expected rows of {self.n_features} features, got {matrix.shape}")
        probs = self.estimator.predict_proba(matrix)
        answers = [
            {
                "model": self.name,
                "label": self.classes[int(np.argmax(p))],
                "score": float(np.max(p)),
                "probs": [round(float(x), 6) for x in p],
            }
            for p in probs
        ]
        return answers[0] if single else {"model": self.name, "predictions": answers}


def load_predictor(path: str | Path, name: str) -> SklearnPredictor:
    """Loads a pickled estimator (only load files you trust: pickle runs code)."""
    try:
        with open(path, "rb") as source:
            estimator = pickle.load(source)  # noqa: S301 - the operator's own model file
    except OSError as exc:
        raise ValueError(f"--model: cannot read {path}: {exc.strerror or exc}") from exc
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"--model: {path} is not a pickled model: {exc}") from exc
    try:
        return SklearnPredictor(estimator, name)
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"--model: {path}: {exc}") from exc
