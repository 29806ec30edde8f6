"""Serving lifecycle: bind first and load in the background (503 meanwhile), drain on SIGTERM/Ctrl-C."""
from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from .models import ModelManager, ServeConfig

log = logging.getLogger("hearthlm.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains before it closes connections: on the first SIGTERM/SIGINT it stops accepting,
    lets running requests finish for up to --drain-timeout, ends the rest with an error event (and [DONE] on
    OpenAI streams), then shuts down and returns (exit 0). A second signal forces the exit."""

    def __init__(self, config: uvicorn.Config, manager: ModelManager):
        super().__init__(config)
        self.manager = manager
        self.failed: BaseException | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # bound: now load (a busy port fails before any loading)
            self.manager.begin_preload()

    def fail(self, exc: BaseException) -> None:
        """The model could not be loaded: stop serving (run_server returns 1)."""
        self.failed = exc
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # like uvicorn's, minus re-raising the signal after shutdown: a drained server exits 0
        if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM):
            self.force_exit = True
            # a forced exit cancels the lifespan task; uvicorn would log that as a traceback
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            log.warning("second signal: exiting now without draining")
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting before draining
            server.close()
        manager, timeout_s = self.manager, self.manager.cfg.drain_timeout_s
        if self.failed is None and not self.force_exit:
            busy = manager.current.active if manager.current is not None else 0
            if busy:
                log.info("shutting down: draining %d running request(s) for up to %.0fs (--drain-timeout)", busy,
                         timeout_s)
            ended = await manager.drain(timeout_s)
            if busy:
                log.info("drained: %d finished, %d ended with an error", busy - ended, ended)
        await super().shutdown(sockets)


def run_server(cfg: ServeConfig) -> int:
    """Serve until SIGTERM/Ctrl-C (0) or a failed model load (1)."""
    from .app import create_app

    holder: list[DrainingServer] = []
    app = create_app(cfg, on_fatal=lambda e: holder[0].fail(e), defer_preload=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = DrainingServer(config, app.state.hearth.manager)
    holder.append(server)
    server.run()
    return 1 if server.failed is not None or not server.started else 0  # failed load, or bind (uvicorn says why)
