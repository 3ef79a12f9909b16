"""The service ``overload.py`` loads: a Starlette app whose backend has a fixed number of slots.

Run by ``overload.py`` in a process of its own (so the load generator does not
share its GIL)::

    python benchmarks/_overload_server.py VARIANT PORT SLOTS SERVICE_TIME

Every request to ``/checkout`` or ``/recommendations`` takes one of the
backend's ``SLOTS`` slots for ``SERVICE_TIME`` seconds (an ``asyncio.sleep``,
standing in for a database or a partner API with a fixed pool); a request that
finds every slot taken queues for one, in arrival order, as it would on a
connection pool. So the backend serves at most ``SLOTS / SERVICE_TIME``
requests a second, and whatever arrives faster waits.

The benchmark's own control routes, never behind the middleware:

- ``POST /_control/slots?n=N``: resize the backend to ``N`` slots now (the
  "capacity halved" phase; queued requests take new slots at once);
- ``POST /_control/brownout?level=L``: ``reskit.set_brownout_level(L, ...)``
  in this process, as an operator would;
- ``GET /_control/stats``: the samples taken every 100 ms (backend slots busy
  and queued, the bulkhead's limit and in-flight count, the brownout level
  and the process's CPU time), with ``time.monotonic()`` times, which the
  load generator shares on Linux;
- ``GET /_control/health``: 200 once the server is up.

The variants (``VARIANTS``):

- ``bare``: no middleware;
- ``static``: ``ShedMiddleware`` with one ``Bulkhead(SLOTS, max_waiting=SLOTS,
  wait_timeout=SERVICE_TIME)`` shared by both routes (sized to the backend);
- ``adaptive``: one ``Bulkhead(1000, limit=GradientLimit(...))`` shared by both routes;
- ``brownout``: as ``adaptive``, and ``/recommendations`` has ``shed_at=1``;
- ``adaptive-defaults`` (not run unless asked for): as ``adaptive`` with
  ``GradientLimit()``'s defaults, to show why ``long_window`` was changed.

Every variant but ``bare`` is also wrapped in ``CorrelationIdMiddleware``: the
whole stack a service would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

VARIANTS = ("bare", "static", "adaptive", "brownout", "adaptive-defaults")

#: How often the server samples its own state for ``/_control/stats``, seconds.
SAMPLE_EVERY = 0.1


class Backend:
    """A pool of ``slots`` slots, each held ``service_time`` seconds per request.

    An ``asyncio.Semaphore`` cannot shrink while it has waiters (it would have
    to queue the shrinking behind them), so this is a small FIFO semaphore
    whose size can change at any moment: a request queued when the pool grows
    takes a new slot at once.
    """

    def __init__(self, slots: int, service_time: float) -> None:
        self.slots = slots
        self.service_time = service_time
        self.busy = 0
        self.served = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def work(self) -> None:
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed over as we were cancelled
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        try:
            await asyncio.sleep(self.service_time)
            self.served += 1
        finally:
            self._release()

    def resize(self, slots: int) -> None:
        self.slots = slots
        self._wake()

    def _release(self) -> None:
        self.busy -= 1
        self._wake()

    def _wake(self) -> None:
        while self.busy < self.slots and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)


def gradient_limit(**overrides: Any) -> Any:
    """The adaptive limit of the ``adaptive`` and ``brownout`` variants.

    The defaults for ``initial`` (20), ``smoothing`` (0.2), ``rtt_tolerance``
    (1.5) and ``queue_size`` (4): nothing a user would have to know about the
    backend. A floor of 2 and a ceiling of 200. One setting differs:
    ``long_window`` counts *samples*, one per request, so the default 600 is
    6 s of history at this service's 100 requests a second, and an overload
    that lasts longer becomes the "usual" latency: the limit climbs back into
    the queue. Netflix's Gradient2, which the algorithm follows, averages over
    600 windows of about a second, some ten minutes; at 100 requests a second
    that is 60,000 samples.
    """
    import reskit

    settings: dict[str, Any] = {
        "initial": 20,
        "min_limit": 2,
        "max_limit": 200,
        "long_window": 60_000,
    }
    settings.update(overrides)
    return reskit.GradientLimit(**settings)


def build(variant: str, slots: int, service_time: float) -> tuple[Any, Backend, Any]:
    """Return ``(app, backend, bulkhead or None)`` for one variant."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    import reskit

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; pick one of {', '.join(VARIANTS)}")
    backend = Backend(slots, service_time)
    samples: list[tuple[float, ...]] = []
    bulkhead: Any = None
    if variant == "static":
        bulkhead = reskit.Bulkhead(
            slots, max_waiting=slots, wait_timeout=service_time, name="backend"
        )
    elif variant in ("adaptive", "brownout"):
        bulkhead = reskit.Bulkhead(1000, limit=gradient_limit(), name="backend")
    elif variant == "adaptive-defaults":
        bulkhead = reskit.Bulkhead(1000, limit=reskit.GradientLimit(), name="backend")

    async def served(request: Request) -> Response:
        await backend.work()
        return PlainTextResponse("ok")

    async def resize(request: Request) -> Response:
        backend.resize(int(request.query_params["n"]))
        return PlainTextResponse("ok")

    async def brownout(request: Request) -> Response:
        reskit.set_brownout_level(
            int(request.query_params["level"]),
            reason="overload benchmark: an alert fired",
            actor="overload-benchmark",
        )
        return PlainTextResponse("ok")

    async def stats(request: Request) -> Response:
        return JSONResponse({"served": backend.served, "samples": samples})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def sample() -> None:
        while True:
            limit = in_flight = waiting = -1
            if bulkhead is not None:
                limit, in_flight, waiting = bulkhead.limit, bulkhead.in_flight, bulkhead.waiting
            samples.append(
                (
                    time.monotonic(),
                    backend.slots,
                    backend.busy,
                    backend.queued,
                    limit,
                    in_flight,
                    waiting,
                    reskit.brownout_level(),
                    time.process_time(),
                )
            )
            await asyncio.sleep(SAMPLE_EVERY)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()

    routes = [
        Route("/checkout", served),
        Route("/recommendations", served),
        Route("/_control/slots", resize, methods=["POST"]),
        Route("/_control/brownout", brownout, methods=["POST"]),
        Route("/_control/stats", stats),
        Route("/_control/health", health),
    ]
    app: Any = Starlette(routes=routes, lifespan=lifespan)
    if bulkhead is not None:
        app = protect(app, bulkhead, shed_recommendations=variant == "brownout")
    return app, backend, bulkhead


def protect(app: Any, bulkhead: Any, *, shed_recommendations: bool) -> Any:
    """Wrap ``app`` in the middleware stack a service would run."""
    from reskit import Policy
    from reskit.asgi import CorrelationIdMiddleware, ShedMiddleware

    routes = {
        # One bulkhead for both routes: they share the backend, so they share its limit.
        "/checkout": Policy("checkout", bulkhead=bulkhead),
        "/recommendations": Policy(
            "recommendations", shed_at=1 if shed_recommendations else None, bulkhead=bulkhead
        ),
    }
    return CorrelationIdMiddleware(ShedMiddleware(app, routes=routes))


def main(argv: list[str]) -> None:
    import uvicorn

    variant, port, slots, service_time = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    app, _, _ = build(variant, slots, service_time)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        # A deep accept queue: the bare variant's clients reconnect after every
        # timeout, and a refused connection would read as the server's fault.
        backlog=4096,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
