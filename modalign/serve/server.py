"""Running the app: uvicorn with the guarded HTTP protocol, a connection cap, timeouts, and a
graceful shutdown that does not wait on generation forever."""

from __future__ import annotations

import uvicorn

from modalign.serve.guard import GuardedH11


def make_server(app, host: str = "127.0.0.1", port: int = 8000, max_connections: int = 256,
                header_timeout_s: float = 10.0, keep_alive_s: int = 5, write_timeout_s: float = 60.0,
                max_pipelined_bytes: int = 21 << 20) -> uvicorn.Server:  # fmt: skip
    """A ``uvicorn.Server``: connections over ``max_connections`` get 503; a connection that sends
    no complete request head within ``header_timeout_s`` seconds is closed; one that reads nothing
    of its response for ``write_timeout_s`` seconds (its write buffer full), or sends more than
    ``max_pipelined_bytes`` ahead of its response, is aborted."""
    protocol = type(
        "Protocol",
        (GuardedH11,),
        {
            "header_timeout": header_timeout_s,
            "write_timeout": write_timeout_s,
            "max_pipelined": max_pipelined_bytes,
        },
    )
    config = uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning",
                            limit_concurrency=max_connections, timeout_keep_alive=keep_alive_s,
                            timeout_graceful_shutdown=10)  # fmt: skip
    return uvicorn.Server(config)


def serve(app, **kw) -> None:
    make_server(app, **kw).run()


def serve_in_thread(app, host: str = "127.0.0.1", start_timeout_s: float = 300.0, **kw):
    """Serve ``app`` on a free port of ``host`` in a daemon thread; returns (base URL, stop) once
    it listens. Start-up (the app's lifespan: a compiled server's warm-up) may take a while on a
    busy machine; a server that fails to start, or is not listening after ``start_timeout_s``
    seconds, raises ``RuntimeError``."""
    import socket
    import threading
    import time

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    srv = make_server(app, host=host, port=port, **kw)
    exit_codes: list = []

    def run():
        try:
            srv.run()
        except SystemExit as e:  # uvicorn exits on a failed start-up (lifespan error, port taken)
            exit_codes.append(e.code)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    deadline = time.monotonic() + start_timeout_s
    while not srv.started:
        if not th.is_alive():
            code = f" (exit code {exit_codes[0]})" if exit_codes else ""
            raise RuntimeError(f"the server on {host}:{port} exited during start-up{code}; see the log above")
        if time.monotonic() > deadline:
            srv.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} was not listening after {start_timeout_s:g} s")
        time.sleep(0.02)

    def stop():
        srv.should_exit = True
        th.join(timeout=15)

    return f"http://{host}:{port}", stop
