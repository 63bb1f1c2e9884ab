"""`dschat serve`'s app on a real uvicorn server in a thread, for the tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`dschat serve`'s app on a real uvicorn server in a thread, on a free loopback port, over `engine`
    (which it owns while it runs: nothing else may generate with it meanwhile)."""

    def __init__(self, engine, names=("demo",), api_key=None, **limits):
        import uvicorn

        from dschat.serve.app import build_app
        from dschat.serve.common import Limits, State

        self.state = State(engine, list(names), Limits(**limits), api_key)
        self.port = free_port()
        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 30, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.state.scheduler.close()  # what still streams ends, so the server stops at once
        self.server.should_exit = True
        self.thread.join(10)
