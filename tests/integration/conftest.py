from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Integration tests run in-process on plain asyncio; agent subprocesses use uvloop."""
    return "asyncio"
