"""``serve_in_thread``: it returns once the server listens, however long the app's start-up takes,
and a server that cannot start raises instead of handing back a URL nothing answers on."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
from fastapi import FastAPI

from modalign.serve.server import serve_in_thread


def app_with_startup(startup):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await startup()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/ping")
    def ping():
        return {"ok": True}

    return app


def test_a_slow_start_up_is_waited_for():
    import asyncio

    async def slow():
        await asyncio.sleep(1.0)

    t = time.monotonic()
    url, stop = serve_in_thread(app_with_startup(slow))
    try:
        assert time.monotonic() - t >= 1.0
        assert httpx.get(f"{url}/ping").json() == {"ok": True}  # listening when it returns
    finally:
        stop()


def test_a_start_up_that_fails_raises():
    async def broken():
        raise RuntimeError("no model")

    before = set(threading.enumerate())  # threads of earlier tests may end meanwhile: not counted
    with pytest.raises(RuntimeError, match="exited during start-up"):
        serve_in_thread(app_with_startup(broken))
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before  # the server's thread is gone


def test_a_start_up_past_the_limit_raises():
    import asyncio

    async def endless():
        await asyncio.sleep(3600)

    with pytest.raises(RuntimeError, match="not listening after 0.5 s"):
        serve_in_thread(app_with_startup(endless), start_timeout_s=0.5)
