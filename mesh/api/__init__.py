"""System APIs: a connector agent serves its system's operations as a NATS service.

* :mod:`mesh.api.client` — :func:`~mesh.api.client.call` an operation (``ApiError`` on failure).
* :mod:`mesh.api.server` — :class:`~mesh.api.server.ApiServer`, the agent's service.
* :mod:`mesh.api.operation` — what an adapter implements (:class:`~mesh.api.operation.Operation`).
* :mod:`mesh.api.discovery` — :func:`~mesh.api.discovery.discover` (``$SRV.INFO``) for ``meshctl api list``.

The wire format and the guarantees are in README "System APIs".
"""

from mesh._api_config import ApiConfig, OperationConfig, ShapeConfig
from mesh.api._results import RESULTS_BUCKET, ensure_results_bucket
from mesh.api._wire import ApiError
from mesh.api.client import call, call_detailed, subject_of
from mesh.api.operation import Call, Operation, Replayed

__all__ = [
    "RESULTS_BUCKET",
    "ApiConfig",
    "ApiError",
    "Call",
    "Operation",
    "OperationConfig",
    "Replayed",
    "ShapeConfig",
    "call",
    "call_detailed",
    "ensure_results_bucket",
    "subject_of",
]
