from __future__ import annotations

import anyio
import pytest
from anyio.abc import TaskStatus

from mesh.actors import Backoff, Supervisor
from mesh.errors import StopError, SystemUnavailable

pytestmark = pytest.mark.anyio


async def test_crashing_actor_is_restarted_and_others_keep_running() -> None:
    runs = 0
    ticks = 0
    restarted: list[str] = []

    async def flaky(task_status: TaskStatus[None]) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        await anyio.sleep(0.01)
        if runs < 4:
            raise RuntimeError(f"boom {runs}")
        await anyio.sleep_forever()

    async def steady(task_status: TaskStatus[None]) -> None:
        nonlocal ticks
        task_status.started()
        while True:
            ticks += 1
            await anyio.sleep(0.005)

    with anyio.fail_after(5):
        async with Supervisor("t", backoff=Backoff(base=0.01, cap=0.05), on_restart=restarted.append) as sup:
            await sup.start("flaky", flaky)
            await sup.start("steady", steady)
            while runs < 4:
                await anyio.sleep(0.01)
            before = ticks
            await anyio.sleep(0.05)
            assert ticks > before
            assert sup.actors["flaky"].restarts == 3
            assert sup.actors["flaky"].last_error == "RuntimeError: boom 3"
            assert "restarts=3" in repr(sup)
            sup.cancel()
    assert restarted == ["flaky"] * 3


async def test_retryable_errors_restart_too() -> None:
    calls = 0

    async def actor(task_status: TaskStatus[None]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SystemUnavailable("db away")
        task_status.started()  # started() still reaches the first caller after a restart
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with Supervisor("t", backoff=Backoff(base=0.01, cap=0.01)) as sup:
            await sup.start("a", actor)
            assert calls == 2
            sup.cancel()


async def test_stop_error_stops_everything_and_is_raised_unwrapped() -> None:
    cancelled = anyio.Event()

    async def other(task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async def fatal(task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep(0.01)
        raise StopError("disk full")

    with anyio.fail_after(5), pytest.raises(StopError, match="disk full"):
        async with Supervisor("t") as sup:
            await sup.start("other", other)
            await sup.start("fatal", fatal)
    assert cancelled.is_set()


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(base=0.1, cap=2.0)
    assert 0.05 <= b.delay(0) <= 0.1
    assert 0.4 <= b.delay(3) <= 0.8
    assert all(1.0 <= b.delay(n) <= 2.0 for n in range(6, 100))
