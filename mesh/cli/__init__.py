"""``meshctl``, the operator's command line: the top layer of the tree.

Only this package and :mod:`mesh.devtools` of ``mesh`` may import ``agents`` and ``adapters``
(enforced by import-linter, see pyproject.toml).
"""

from mesh.cli.main import app, main

__all__ = ["app", "main"]
