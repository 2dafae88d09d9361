"""REST API and web status page of the node (FastAPI + uvicorn; see :mod:`cad_node.web.app`).

:class:`WebServer` runs the app in a thread of ``cad-node serve`` when
``web.enabled`` is true, bound to ``web.host`` (loopback by default).
"""

from __future__ import annotations

import logging
import threading
import time

from cad_node.web.app import STAGES, WebContext, create_app

__all__ = ["STAGES", "WebContext", "WebServer", "create_app"]

LOG = logging.getLogger(__name__)


class WebServer:
    """uvicorn serving :func:`create_app` in a daemon thread.

    Parameters
    ----------
    ctx : WebContext
        What the app reads and acts on.
    host, port : str, int
        Where to listen (``port`` 0 picks a free port; see :attr:`port`).
    """

    def __init__(self, ctx: WebContext, host: str, port: int) -> None:
        import uvicorn

        self.ctx = ctx
        config = uvicorn.Config(create_app(ctx), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; return once the socket listens.

        Raises
        ------
        RuntimeError
            The server did not start (e.g. the port is in use).
        """
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("web server did not start (port in use?)")
            time.sleep(0.05)

    @property
    def port(self) -> int:
        """The port it listens on."""
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("web server not started")

    def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
