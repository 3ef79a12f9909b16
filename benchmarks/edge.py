"""What the edge middleware costs a service in requests per second, against the bare app.

Seven kinds of uvicorn server run the same Starlette app (a JSON endpoint that does
a little work, as the smallest real handler would). Three without tracing:

- **bare**: the app alone;
- **stack**: the same app behind ``CorrelationIdMiddleware`` (outermost) and
  ``ShedMiddleware`` (a policy with a kill switch, a brownout ``shed_at`` and a
  bulkhead with an adaptive limit). No tracer provider is configured, so the
  span part of the stack is what it is in such a service: a look that finds
  nothing records;
- **deadline**: the app behind ``DeadlineMiddleware`` alone (every request
  carries ``X-Request-Timeout-Ms``, so each gets a deadline on reskit's timer
  wheel).

For scale, the correlation ID part alone, from two libraries (each with its
defaults; every request carries a valid ID, so neither makes one):

- **correlation**: reskit's ``CorrelationIdMiddleware`` alone;
- **asgi_correlation_id**: the ``CorrelationIdMiddleware`` of the
  asgi-correlation-id package.

And two with an OpenTelemetry SDK tracer provider (spans batched to an
exporter that drops them: the cost in the service, not the network's):

- **traced**: the bare app with the least a working server span does, written
  by hand around the SDK: started from the request, made current (so the
  app's own spans are its children), the response status recorded, ended;
- **stack_traced**: the stack, whose correlation middleware makes the span
  (with the correlation ID, and the rejection reason when shed).

A load generator in this process keeps ``--connections`` keep-alive
connections busy (raw HTTP/1.1 over asyncio streams: it costs a few
microseconds a request, so the server, not the client, is what saturates) for
a fixed time per round, rotating through the servers round by round so all see
the same machine load. Each kind runs as ``--replicas`` processes (each
draws its own string-hash seed, which alone moves a process's speed by a
percent or two), and its rate in a round is their mean. Each server's own CPU time per request
gives its capacity. Budgets: ``stack / bare`` and ``stack_traced / traced`` at least
0.9, ``deadline / bare`` at least 0.95 (the middleware adds at most 5% to a
request's cost); ``--check`` exits 1 when one is below its budget divided by
``--margin``. Also printed, for scale: ``traced / bare`` (what the SDK's span
costs by itself), ``stack_traced / bare`` (what turning on tracing and the
stack together cost an untraced service), and each correlation middleware's
own ratio to ``bare``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

#: variant: (baseline, budget of baseline CPU / variant CPU)
BUDGETS = {"stack": ("bare", 0.9), "stack_traced": ("traced", 0.9), "deadline": ("bare", 0.95)}

SERVER = textwrap.dedent(
    """
    import sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def order(request):
        lines = [{"sku": f"sku-{i}", "qty": i % 3 + 1, "price": 1000 + i} for i in range(20)]
        return JSONResponse({"order": request.path_params["id"],
                             "total": sum(l["qty"] * l["price"] for l in lines)})

    async def healthz(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/api/orders/{id}", order), Route("/healthz", healthz)])
    kind = sys.argv[2]
    if kind in ("traced", "stack_traced"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor, SpanExporter, SpanExportResult,
        )

        class Drop(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)
    if kind == "traced":
        # The least a working server span does, by hand: started, current, status, ended.
        from opentelemetry import context
        from opentelemetry.trace import SpanKind, set_span_in_context

        tracer = trace.get_tracer("bench")
        untraced = app

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return await untraced(scope, receive, send)
            span = tracer.start_span(scope["method"], kind=SpanKind.SERVER, attributes={
                "http.request.method": scope["method"], "url.path": scope["path"],
                "url.scheme": scope["scheme"]})
            token = context.attach(set_span_in_context(span))

            async def send_status(message):
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)

            try:
                await untraced(scope, receive, send_status)
            finally:
                span.end()
                context.detach(token)
    elif kind in ("stack", "stack_traced"):
        from reskit import AIMDLimit, Bulkhead, Policy
        from reskit.asgi import CorrelationIdMiddleware, ShedMiddleware

        policy = Policy(
            "orders",
            kill_switch=True,
            shed_at=3,
            bulkhead=Bulkhead(1000, limit=AIMDLimit(initial=200, max_limit=1000)),
        )
        app = CorrelationIdMiddleware(ShedMiddleware(app, routes={"/api": policy}))
    elif kind == "deadline":
        from reskit.asgi import DeadlineMiddleware

        app = DeadlineMiddleware(app, maximum=30.0)
    elif kind == "correlation":
        from reskit.asgi import CorrelationIdMiddleware

        app = CorrelationIdMiddleware(app)
    elif kind == "asgi_correlation_id":
        from asgi_correlation_id import CorrelationIdMiddleware

        app = CorrelationIdMiddleware(app)
    print("listening", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
    """
)


# With two or more CPUs the servers share one and the load generator has another, so the
# scheduler cannot put a server and the generator on one CPU in some rounds and not others.
KINDS = (
    "bare",
    "stack",
    "deadline",
    "correlation",
    "asgi_correlation_id",
    "traced",
    "stack_traced",
)
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
SERVER_CPU = CPUS[-1] if len(CPUS) >= 2 else None
LOAD_CPU = CPUS[0] if len(CPUS) >= 2 else None


def _pin(cpu: int | None) -> Any:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), kind],
        stdout=subprocess.PIPE,
        preexec_fn=_pin(SERVER_CPU),
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"listening":
        raise RuntimeError(f"the {kind} server did not start")
    deadline = time.monotonic() + 30
    while True:  # uvicorn binds just after the line above: the one wait here
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the {kind} server did not start") from None
            time.sleep(0.02)


async def _connection(port: int, until: float, counts: list[int], number: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        # The ID is 32 hex digits, as a UUID's: valid for both correlation middlewares.
        f"GET /api/orders/{number} HTTP/1.1\r\nHost: bench\r\nX-Request-ID: {number:032x}\r\n"
        "X-Request-Timeout-Ms: 5000\r\n\r\n"
    ).encode()
    done = 0
    try:
        while time.perf_counter() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:60]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done += 1
    finally:
        counts.append(done)
        writer.close()


async def _load(port: int, connections: int, seconds: float) -> tuple[int, float]:
    """Requests answered, and the seconds it took."""
    counts: list[int] = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_connection(port, until, counts, n) for n in range(connections)))
    return sum(counts), time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux), or 0.0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rounds: int, seconds: float, connections: int, replicas: int) -> dict[str, float]:
    # Each process draws its own string-hash seed, which lays out its dicts: one process
    # of the same code can be a percent or two faster or slower than the next. A kind's
    # figure is the mean of several processes, so no one draw decides it.
    servers = {(name, number): start(name) for name in KINDS for number in range(replicas)}
    if LOAD_CPU is not None:
        os.sched_setaffinity(0, {LOAD_CPU})
    try:
        samples: dict[str, list[float]] = {name: [] for name in KINDS}
        cpu = dict.fromkeys(KINDS, 0.0)
        answered = dict.fromkeys(KINDS, 0)
        for _, port in servers.values():  # warm-up: imports, first spans, the limit
            asyncio.run(_load(port, connections, seconds / 2))
        for round_number in range(rounds):
            order = list(servers.items())
            shift = round_number * replicas % len(order)
            order = order[shift:] + order[:shift]
            rates: dict[str, list[float]] = {name: [] for name in KINDS}
            for (name, _), (process, port) in order:
                before = _cpu_seconds(process.pid)
                count, took = asyncio.run(_load(port, connections, seconds))
                cpu[name] += _cpu_seconds(process.pid) - before
                answered[name] += count
                rates[name].append(count / took)
            for name, values in rates.items():
                samples[name].append(statistics.fmean(values))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    result = {name: statistics.median(values) for name, values in samples.items()}
    for name in KINDS:
        result[f"{name}_cpu_us"] = cpu[name] / answered[name] * 1e6 if answered[name] else 0.0
    for name, (base, _) in BUDGETS.items():
        result[f"{name}_ratio"] = result[name] / result[base]
        # Round by round, so a noisy neighbour shows as spread rather than hiding in a median.
        ratios = [s / b for s, b in zip(samples[name], samples[base], strict=True)]
        result[f"{name}_ratio_min"] = min(ratios)
        result[f"{name}_ratio_max"] = max(ratios)
        # The server's own CPU time per request: what one worker can serve at most, and
        # far less moved by whatever else runs on the machine than requests per second.
        if result[f"{name}_cpu_us"]:
            result[f"{name}_cpu_ratio"] = result[f"{base}_cpu_us"] / result[f"{name}_cpu_us"]
    for name in ("traced", "stack_traced", "correlation", "asgi_correlation_id"):
        if result[f"{name}_cpu_us"]:
            result[f"{name}_vs_bare_cpu_ratio"] = result["bare_cpu_us"] / result[f"{name}_cpu_us"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer, shorter rounds (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 under budget")
    parser.add_argument("--margin", type=float, default=1.1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=3, help="server processes of each kind")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    figures = measure(
        rounds=4 if args.short else 10,
        seconds=1.0 if args.short else 1.5,
        connections=args.connections,
        replicas=args.replicas,
    )
    print(
        f"requests/s, median of rounds: bare app {figures['bare']:.0f} "
        f"({figures['bare_cpu_us']:.0f} us of server CPU a request); with an SDK server "
        f"span {figures['traced']:.0f} ({figures['traced_cpu_us']:.0f} us)"
    )
    labels = {
        "stack": "correlation IDs and shedding, no tracing",
        "stack_traced": "correlation IDs, shedding and a server span",
        "deadline": "DeadlineMiddleware",
    }
    failed = []
    for name, (base, budget) in BUDGETS.items():
        ratio = figures.get(f"{name}_cpu_ratio", figures[f"{name}_ratio"])
        print(
            f"  {labels[name]}: {figures[name]:.0f}, x{figures[f'{name}_ratio']:.3f} of {base} "
            f"(rounds x{figures[f'{name}_ratio_min']:.3f} to x{figures[f'{name}_ratio_max']:.3f}); "
            f"{figures[f'{name}_cpu_us']:.0f} us of CPU a request: capacity x{ratio:.3f} of "
            f"{base} (must be at least {budget})"
        )
        if ratio < budget / args.margin:
            failed.append(f"{name}/{base} {ratio:.3f} < {budget} / {args.margin}")
    print(
        "  for scale, against the bare app without tracing: the SDK's server span alone "
        f"x{figures.get('traced_vs_bare_cpu_ratio', 0.0):.3f}; tracing and the stack "
        f"x{figures.get('stack_traced_vs_bare_cpu_ratio', 0.0):.3f}; a correlation ID alone, "
        f"reskit's x{figures.get('correlation_vs_bare_cpu_ratio', 0.0):.3f}, "
        f"asgi-correlation-id's x{figures.get('asgi_correlation_id_vs_bare_cpu_ratio', 0.0):.3f}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
