"""The declaration of a named API policy (``[policies.<name>]`` in an agent config); defined in
:mod:`mesh._policy_config` so that :mod:`mesh.config` can use it without an import cycle."""

from __future__ import annotations

from mesh._policy_config import PolicyConfig

__all__ = ["PolicyConfig"]
