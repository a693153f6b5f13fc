"""`modelgate mock`: fake model servers for tests, benches and the demo (`server`), with
real scikit-learn models behind them when asked (`models`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.mock.models import (
        ModelError,
        SklearnPredictor,
        load_predictor,
    )
    from modelgate.mock.server import (
        DEFAULT_DRIFT,
        LABELS,
        MOCK_STATE,
        RANKING_SIZE,
        LatencyDist,
        MockSettings,
        MockState,
        StreamMode,
        build_app,
        configure_parser,
        predict,
        run_from_args,
        sample_latency_ms,
        settings_from_args,
        start_mock,
    )

__all__ = [
    "DEFAULT_DRIFT",
    "LABELS",
    "LatencyDist",
    "MOCK_STATE",
    "MockSettings",
    "MockState",
    "ModelError",
    "RANKING_SIZE",
    "SklearnPredictor",
    "StreamMode",
    "build_app",
    "configure_parser",
    "load_predictor",
    "predict",
    "run_from_args",
    "sample_latency_ms",
    "settings_from_args",
    "start_mock",
]

__getattr__ = lazy_face(
    __name__,
    {
        "DEFAULT_DRIFT": "server",
        "LABELS": "server",
        "LatencyDist": "server",
        "MOCK_STATE": "server",
        "MockSettings": "server",
        "MockState": "server",
        "ModelError": "models",
        "RANKING_SIZE": "server",
        "SklearnPredictor": "models",
        "StreamMode": "server",
        "build_app": "server",
        "configure_parser": "server",
        "load_predictor": "models",
        "predict": "server",
        "run_from_args": "server",
        "sample_latency_ms": "server",
        "settings_from_args": "server",
        "start_mock": "server",
    },
)
