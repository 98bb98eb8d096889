"""The public surface is declared: every public module has ``__all__`` and it names real things."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["mesh", "agents", "adapters"]


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            last = info.name.rsplit(".", 1)[-1]
            if last.startswith("_"):
                continue  # private helpers
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_module_declares_its_exports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not exist"
    public_defs = {
        k for k, v in vars(module).items()
        if not k.startswith("_") and getattr(v, "__module__", None) == name
        and (isinstance(v, type) or callable(v))
    }  # fmt: skip
    undeclared = public_defs - set(exported)
    assert not undeclared, f"{name} defines public {sorted(undeclared)} without exporting them"
