"""Developer tools on top of the runtime: the embedded dev stack (``meshctl dev up``) and the
benchmarks (``meshctl bench``, ``bin/bench-cp``). Like :mod:`mesh.cli`, they may import
``agents`` and ``adapters``."""

__all__: list[str] = []
