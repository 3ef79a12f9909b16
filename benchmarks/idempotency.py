"""What IdempotencyMiddleware costs a service, under a real server, against the bare app.

Two uvicorn processes serve the same Starlette app, one bare and one wrapped in
``reskit.asgi.IdempotencyMiddleware`` on the memory store. One httpx client,
with keep-alive, sends the same POST (a 20-line order, which the handler parses
and prices, then awaits a 1 ms call standing in for the payment provider: a real
one takes tens of milliseconds) to each, in interleaved rounds so both see the
same machine load:

- **bare**: the app without the middleware;
- **first**: a new ``Idempotency-Key`` on every request (claim, run, store);
- **replay**: one key, already stored (the middleware answers; the app is not called).

Reported: the median time per request of each, and the ratios ``first / bare``
(budget 1.3) and ``replay / bare`` (it must be under 1.0: a replay answers
without the handler's work). ``--check`` exits 1 when ``first / bare`` is over
its budget times ``--margin`` (default 1.5), or ``replay / bare`` is not under 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import uuid

FIRST_BUDGET = 1.3
REPLAY_BUDGET = 1.0

SERVER = textwrap.dedent(
    """
    import asyncio, json, sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def charge(request: Request) -> JSONResponse:
        order = await request.json()
        total = sum(line["qty"] * line["price"] for line in order["lines"])
        await asyncio.sleep(0.001)  # the payment provider's answer, at its very fastest
        return JSONResponse(
            {"order": order["order"], "total": total, "status": "charged", "lines": order["lines"]},
            status_code=201,
        )

    app = Starlette(routes=[Route("/charges", charge, methods=["POST"])])
    if sys.argv[2] == "wrapped":
        from reskit.asgi import IdempotencyMiddleware

        app = IdempotencyMiddleware(app)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
    """
)

ORDER = {
    "order": "A-1",
    "customer": "c-42",
    "currency": "EUR",
    "lines": [{"sku": f"sku-{i}", "qty": i % 3 + 1, "price": 1000 + i} for i in range(20)],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(kind: str) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), kind])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # the server takes a moment to bind: the one wait here
        try:
            httpx.get(url + "/", timeout=1)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the {kind} server did not start") from None
            time.sleep(0.05)


def measure(rounds: int, per_round: int) -> dict[str, float]:
    import httpx

    body = json.dumps(ORDER).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer bench"}
    servers = [start("bare"), start("wrapped")]
    try:
        bare_url, wrapped_url = servers[0][1], servers[1][1]
        samples: dict[str, list[float]] = {"bare": [], "first": [], "replay": []}
        with httpx.Client() as client:
            replay_headers = {**headers, "idempotency-key": "bench-replay"}
            assert (
                client.post(
                    wrapped_url + "/charges", content=body, headers=replay_headers
                ).status_code
                == 201
            )

            def bare() -> None:
                client.post(bare_url + "/charges", content=body, headers=headers)

            def first() -> None:
                key = {**headers, "idempotency-key": uuid.uuid4().hex}
                client.post(wrapped_url + "/charges", content=body, headers=key)

            def replay() -> None:
                response = client.post(
                    wrapped_url + "/charges", content=body, headers=replay_headers
                )
                assert response.headers["idempotent-replayed"] == "true"

            variants = {"bare": bare, "first": first, "replay": replay}
            for _ in range(per_round):  # warm-up
                for fn in variants.values():
                    fn()
            for round_number in range(rounds):
                order = list(variants.items())
                order = order[round_number % 3 :] + order[: round_number % 3]
                for name, fn in order:
                    started = time.perf_counter()
                    for _ in range(per_round):
                        fn()
                    samples[name].append((time.perf_counter() - started) / per_round)
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=30)
    result = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    result["first_ratio"] = result["first"] / result["bare"]
    result["replay_ratio"] = result["replay"] / result["bare"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer rounds (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 over budget")
    parser.add_argument("--margin", type=float, default=1.5)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure(rounds=9 if args.short else 31, per_round=100 if args.short else 200)
    print(
        f"per request, median of rounds: bare app {figures['bare']:.0f} us, "
        f"first request with a key {figures['first']:.0f} us "
        f"(x{figures['first_ratio']:.2f}, budget {FIRST_BUDGET}), "
        f"replay {figures['replay']:.0f} us (x{figures['replay_ratio']:.2f}, must be under "
        f"{REPLAY_BUDGET})"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    failed = []
    if figures["first_ratio"] > FIRST_BUDGET * args.margin:
        failed.append(f"first/bare {figures['first_ratio']:.2f} > {FIRST_BUDGET} x {args.margin}")
    if figures["replay_ratio"] >= REPLAY_BUDGET:
        failed.append(f"replay/bare {figures['replay_ratio']:.2f} is not under {REPLAY_BUDGET}")
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
