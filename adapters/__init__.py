"""Adapters to external systems: one sub-package per kind of system (Source and/or Sink)."""

__all__: list[str] = []
