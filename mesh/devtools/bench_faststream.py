"""The FastStream peer of ``meshctl bench``: the pipeline a competent user would write instead of
the mesh (a benchmark helper, not part of the product; needs the ``bench`` extra).

Two processes, like the mesh's source and sink agents, so CPU and RSS are measured per process:

* ``pub``: reads the source SQLite table in id order (2,000 rows a query, polled every 5 ms) and
  publishes each row to JetStream with FastStream's ``NatsBroker.publish`` (512 in flight,
  ``Nats-Msg-Id`` = the row id, PubAck awaited). No outbox: at-least-once from the table.
* ``sub``: a FastStream batch ``PullSub`` (1,000 a fetch, 50 ms) upserting each batch into the
  target with aiosqlite ``executemany`` in one transaction; FastStream acks after the handler.
  No inbox: a redelivered batch is applied again (the upsert makes that harmless here).

``--patched`` works around FastStream 0.7's batch pull loop catching only nats-py's own
``TimeoutError``: nats-py can raise a bare ``asyncio.TimeoutError`` from ``fetch`` and the loop
then drops the messages it collected so far (they come back after ack_wait).

Run by :mod:`mesh.devtools.bench` as ``python -m mesh.devtools.bench_faststream pub|sub ...``
until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any

__all__ = ["STREAM", "SUBJECT", "main"]

STREAM = "FSBENCH"
SUBJECT = "fsbench.event"
_UPSERT = (
    "INSERT INTO events (id, payload, amount_cents, created_ms) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET payload = excluded.payload, "
    "amount_cents = excluded.amount_cents, created_ms = excluded.created_ms"
)


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _pub(url: str, creds: str, db: str) -> None:
    import aiosqlite
    from faststream.nats import NatsBroker

    broker = NatsBroker(url, user_credentials=creds, log_level=logging.DEBUG)
    await broker.connect()
    limiter = asyncio.Semaphore(512)

    async def one(row: Any) -> None:
        async with limiter:
            body = {"id": row[0], "payload": row[1], "amount_cents": row[2], "created_ms": row[3]}
            await broker.publish(body, SUBJECT, stream=STREAM, headers={"Nats-Msg-Id": str(row[0])})

    async def loop() -> None:
        last = 0
        async with aiosqlite.connect(db) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT id, payload, amount_cents, created_ms FROM events"
                    " WHERE id > ? ORDER BY id LIMIT 2000",
                    (last,),
                )
                rows = list(await cur.fetchall())
                if not rows:
                    await asyncio.sleep(0.005)
                    continue
                while rows:  # at-least-once: publish again what was not acked (same msg id)
                    outcomes = await asyncio.gather(*(one(r) for r in rows), return_exceptions=True)
                    failed = [r for r, o in zip(rows, outcomes, strict=True) if isinstance(o, Exception)]
                    errors = [o for o in outcomes if isinstance(o, Exception)]
                    if errors:
                        logging.warning("%d publishes failed (%r); again", len(errors), errors[0])
                    last = max(last, rows[-1][0])
                    rows = failed

    task = asyncio.create_task(loop())
    await _until_terminated()
    task.cancel()
    await broker.stop()


async def _sub(url: str, creds: str, db: str, patched: bool) -> None:
    import aiosqlite
    from faststream.nats import JStream, NatsBroker, PullSub

    if patched:
        from faststream.nats.subscriber.usecases import stream_pull_subscriber

        # catch the bare asyncio.TimeoutError too (nats-py's own TimeoutError subclasses it)
        setattr(stream_pull_subscriber, "TimeoutError", TimeoutError)  # noqa: B010

    conn = await aiosqlite.connect(db)
    # Its per-message INFO lines ("Received", "Processed") at DEBUG, as for a throughput job.
    broker = NatsBroker(url, user_credentials=creds, log_level=logging.DEBUG)

    @broker.subscriber(
        SUBJECT,
        stream=JStream(STREAM, declare=False),
        durable="fsbench",
        pull_sub=PullSub(batch_size=1000, timeout=0.05, batch=True),
    )
    async def handle(events: list[dict[str, Any]]) -> None:
        rows = [(e["id"], e["payload"], e["amount_cents"], e["created_ms"]) for e in events]
        await conn.executemany(_UPSERT, rows)
        await conn.commit()

    await broker.start()
    await _until_terminated()
    await broker.stop()
    await conn.close()


def main(argv: list[str] | None = None) -> None:
    """Run the publisher or the subscriber until SIGTERM."""
    p = argparse.ArgumentParser(prog="bench_faststream")
    p.add_argument("role", choices=["pub", "sub"])
    p.add_argument("--url", required=True)
    p.add_argument("--creds", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--patched", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.role == "pub":
        asyncio.run(_pub(a.url, a.creds, a.db))
    else:
        asyncio.run(_sub(a.url, a.creds, a.db, a.patched))
    print(json.dumps({"role": a.role, "done": True}), flush=True)


if __name__ == "__main__":
    main()
