"""Holding the store's one writer thread, for tests of what shares a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.store.db import Database


@asynccontextmanager
async def held(db: Database) -> AsyncIterator[None]:
    """Keep the db thread busy inside one job, so everything submitted meanwhile waits and
    then lands in the next batch (one transaction); nothing submitted meanwhile commits."""
    started, release = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    blocker = db.submit(block)
    await asyncio.to_thread(started.wait, 10)
    try:
        yield
    finally:
        release.set()
        await blocker
