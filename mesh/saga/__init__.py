"""Durable sagas (README "Orchestration (sagas)"): definitions, state in ``mesh_sagas``, engine."""

from mesh.saga.definition import (
    CompensateDef,
    OrchestratorConfig,
    RetryPolicy,
    SagaDef,
    StepDef,
    TriggerDef,
    load_orchestrator_config,
    parse_orchestrator_config,
)
from mesh.saga.engine import Orchestrator, retry_saga
from mesh.saga.state import SAGA_BUCKET, SagaRecord, StepRecord, decode_record

__all__ = [
    "SAGA_BUCKET",
    "CompensateDef",
    "Orchestrator",
    "OrchestratorConfig",
    "RetryPolicy",
    "SagaDef",
    "SagaRecord",
    "StepDef",
    "StepRecord",
    "TriggerDef",
    "decode_record",
    "load_orchestrator_config",
    "parse_orchestrator_config",
    "retry_saga",
]
