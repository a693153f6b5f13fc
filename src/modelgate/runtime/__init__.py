"""The processes that run a gateway: `modelgate serve` (`serve`: gateway, control plane and
admin API with their signals), `--workers N` (`workers`, and each forked `worker`), and the
config file watch (`watch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.runtime.serve import (
        LocalTarget,
        attach_control,
        process_telemetry,
        serve,
        start_gateway,
        supervise,
        switch_chaos,
        track_gateway,
    )
    from modelgate.runtime.watch import (
        POLL_INTERVAL_S,
        watch_file,
    )
    from modelgate.runtime.worker import (
        MAX_FRAME,
        WorkerState,
        receive_frame,
        send_frame,
        worker_main,
    )
    from modelgate.runtime.workers import (
        WorkerPool,
        serve_workers,
    )

__all__ = [
    "LocalTarget",
    "MAX_FRAME",
    "POLL_INTERVAL_S",
    "WorkerPool",
    "WorkerState",
    "attach_control",
    "process_telemetry",
    "receive_frame",
    "send_frame",
    "serve",
    "serve_workers",
    "start_gateway",
    "supervise",
    "switch_chaos",
    "track_gateway",
    "watch_file",
    "worker_main",
]

__getattr__ = lazy_face(
    __name__,
    {
        "LocalTarget": "serve",
        "MAX_FRAME": "worker",
        "POLL_INTERVAL_S": "watch",
        "WorkerPool": "workers",
        "WorkerState": "worker",
        "attach_control": "serve",
        "process_telemetry": "serve",
        "receive_frame": "worker",
        "send_frame": "worker",
        "serve": "serve",
        "serve_workers": "workers",
        "start_gateway": "serve",
        "supervise": "serve",
        "switch_chaos": "serve",
        "track_gateway": "serve",
        "watch_file": "watch",
        "worker_main": "worker",
    },
)
