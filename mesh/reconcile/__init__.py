"""Reconciliation: prove that a flow's source and targets agree, and repair them when not.

``meshctl reconcile FLOW [--repair] [--json]`` (:mod:`mesh.cli.reconcile`) drives a
:class:`Reconciler`; every agent answers through a :class:`ReconcileService` on
``<prefix>.reconcile.<agent>`` (:func:`reconcile_subject`), reading its side through the
adapter's optional ``reconcile`` capability (:class:`mesh.plugins.ReconcileAccess`).
"""

from mesh.reconcile.driver import ReconcileError, Reconciler
from mesh.reconcile.models import (
    Difference,
    ReconcileReply,
    ReconcileRequest,
    Report,
    TargetReport,
    reconcile_subject,
)
from mesh.reconcile.service import ReconcileService

__all__ = [
    "Difference",
    "ReconcileError",
    "ReconcileReply",
    "ReconcileRequest",
    "ReconcileService",
    "Reconciler",
    "Report",
    "TargetReport",
    "reconcile_subject",
]
