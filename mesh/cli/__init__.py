"""``meshctl``, the operator's command line: the top layer of the tree.

Only this package and :mod:`mesh.devtools` of ``mesh`` may import ``agents`` and ``adapters``
(enforced by import-linter, see pyproject.toml).

``meshctl agent run`` (without ``--help``) goes straight to the lean agent entry
(:mod:`agents.entry`) without importing the rest of the CLI, so an agent process carries only
the runtime; ``app`` (the typer application) is imported on first use.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.cli.main import app

__all__ = ["app", "main"]


def main() -> None:
    """The ``meshctl`` console script: run the command in ``sys.argv``; exits with its code."""
    argv = sys.argv[1:]
    if argv[:2] == ["agent", "run"] and not {"--help", "-h"} & set(argv[2:]) and len(argv) > 2:
        from agents.entry import main as agent_main

        agent_main(argv[2:], prog="meshctl agent run")
    from mesh.cli.main import main as cli_main

    cli_main()


def __getattr__(name: str) -> Any:
    if name == "app":
        from mesh.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``mesh.cli.main`` the entry function (as when this package imported it eagerly):
    importing the submodule :mod:`mesh.cli.main` later must not rebind the name to the module
    (it stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "main" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
