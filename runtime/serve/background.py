"""The server in a thread of the current process, on 127.0.0.1 and a port the system picks.

For callers that hold the models themselves and talk to them over HTTP too: ``ember bench --http`` (the engine
driven directly and through the server, on the same pipeline, in one run) and the tests. ``ember serve`` runs
uvicorn in the foreground instead, with its signal handling.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

START_TIMEOUT_S = 60.0


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.base_url + "/health")``; leaving the block shuts
    the server down gracefully (running responses get ``shutdown_timeout`` seconds)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", shutdown_timeout: int = 5):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=0, log_level="warning",
                                timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self.host = host
        self.port: int | None = None
        self._thread = threading.Thread(target=self.server.run, name="ember-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
