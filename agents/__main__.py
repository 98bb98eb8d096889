"""``python -m agents --config FILE``: run a connector agent (see :mod:`agents.entry`)."""

from agents.entry import main

__all__: list[str] = []

main(prog="python -m agents")
