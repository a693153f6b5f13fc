"""Real scikit-learn models behind mock-model: predictions, bad requests, bad model files."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from sklearn.datasets import load_iris  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

from modelgate.mock.models import SklearnPredictor, load_predictor
from modelgate.mock.server import MockSettings, start_mock

from .support import async_test


def trained() -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
    data = load_iris()
    model = LogisticRegression(max_iter=500).fit(data.data, data.target)
    return model, data.data, data.target


def test_predictions_equal_the_estimators(tmp_path: Path) -> None:
    model, features, _ = trained()
    path = tmp_path / "iris.pkl"
    path.write_bytes(pickle.dumps(model))
    predictor = load_predictor(path, "iris-v1")

    @async_test
    async def run() -> list[int]:
        runner, port = await start_mock(MockSettings(name="iris-v1", predictor=predictor))
        labels = []
        try:
            async with aiohttp.ClientSession() as session:
                for row in features[:30]:
                    async with session.post(
                        f"http://127.0.0.1:{port}/predict", json={"features": row.tolist()}
                    ) as response:
                        answer = await response.json()
                        assert answer["model"] == "iris-v1"
                        assert sum(answer["probs"]) == pytest.approx(1.0, abs=1e-5)
                        labels.append(answer["label"])
                async with session.post(
                    f"http://127.0.0.1:{port}/predict", json={"features": [1, 2]}
                ) as response:
                    assert response.status == 400
                    assert "expected rows of 4 features" in (await response.json())["detail"]
        finally:
            await runner.cleanup()
        return labels

    assert run() == model.predict(features[:30]).tolist()


def test_batch_instances() -> None:
    model, features, _ = trained()
    answer = SklearnPredictor(model, "m")(
        b'{"instances": ' + str(features[:3].tolist()).encode() + b"}"
    )
    assert [p["label"] for p in answer["predictions"]] == model.predict(features[:3]).tolist()


def test_a_bad_model_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="is not a pickled model"):
        load_predictor(bad, "x")
    result = subprocess.run(
        [sys.executable, "-m", "modelgate", "mock-model", "--model", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--model" in result.stderr + result.stdout
