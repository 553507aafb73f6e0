"""uvicorn's server for codegen-serve: a stop (SIGTERM, Ctrl-C) drains the requests in flight.

uvicorn, told to stop, closes its listening socket, closes idle connections and waits for the others, at most
its timeout_graceful_shutdown, after which it cancels the requests' tasks (a stream is cut with neither an
error event nor [DONE]). DrainingServer starts the state's drain first: running requests get the grace
period, then ServerState.end_drain() ends those still running, streams with `data: {"error": ...}`. Set
uvicorn's own limit to the grace period plus CLOSE_MARGIN_S, a backstop for clients that do not read.

uvicorn raises the signal again once it is done, but inside asyncio.run, whose own Ctrl-C handling can lose it
(the main task ends before the cancellation lands): DrainingServer records the signal itself (`stopped_by`),
which codegen-serve's command turns into exit 143 or 130.
"""

from __future__ import annotations

import uvicorn

from .state import ServerState

# Seconds past the grace period for the streams it ended to send their error event and close.
CLOSE_MARGIN_S = 3


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that begins `state`'s drain (with `grace` seconds) when it starts shutting down."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float):
        super().__init__(config)
        self.state, self.grace = state, grace
        self.stopped_by: int | None = None  # the first signal that stopped the server

    def handle_exit(self, sig: int, frame) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.state.begin_drain(self.grace)
        await super().shutdown(sockets=sockets)
