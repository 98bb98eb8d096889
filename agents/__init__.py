"""Agent roles built on :mod:`mesh`: the connector agent (and, later, the control plane)."""

__all__: list[str] = []
