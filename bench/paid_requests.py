"""Concurrent paid image requests against the sandbox: the bot's CPU, wall time and loop lag.

Run: ``.venv/bin/python bench/paid_requests.py [--levels 50,500] [--latency 0.2]``.
The sandbox gateway runs in a child process, so its CPU is not counted as the bot's. Each
level runs imagebot (``ImageService`` + ``X402Payer`` + the bot's ``gateway_client()``), then, in
a separate phase, BlockRun's ``blockrun-llm`` SDK (``ImageClient`` in threads) when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as StopEvent
from typing import Any

import httpx
from eth_account import Account

from bot.commands import parse
from bot.http import GATEWAY_CONNECTIONS, gateway_client
from bot.images import ImageService
from bot.requests import GenerateRequest, ImageCommand
from bot.x402 import Wallet, X402Payer
from sandbox import Sandbox

COMMAND = "/imagegen -m gpt-image a fox"
TICK_SECONDS = 0.01
WARMUP_REQUESTS = 5
TARGET_CPU_MS = 3.0
TARGET_WALL_RATIO_AT_50 = 2.0
TARGET_LAG_MS = 50.0
PACKAGES = ("httpx", "httpx-aiohttp", "httpcore", "aiohttp", "blockrun-llm")


@dataclass(frozen=True)
class Gateway:
    """The sandbox's address and the id of the process that runs it."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU the sandbox process has used so far (user + system), from /proc."""
        return sum(process_cpu(self.pid))

    def settled(self) -> int:
        """How many payments the sandbox has settled so far."""
        response = httpx.get(f"{self.url}/sandbox/settlements", timeout=30)
        response.raise_for_status()
        return len(response.json()["settlements"])


@dataclass(frozen=True)
class Batch:
    """What one measured batch of ``count`` concurrent requests cost."""

    client: str
    count: int
    ok: int
    settled: int
    cpu_seconds: float  # the bench process's, all threads
    wall_seconds: float
    worst_lag_seconds: float
    sandbox_cpu_seconds: float
    first_error: str | None

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds / self.count * 1000


def process_cpu(pid: int, thread: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of every thread of process ``pid`` so far, or of its thread
    ``thread`` alone, from /proc."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


@contextmanager
def sandbox_process(latency: float, picture_origin: str | None = None) -> Iterator[Gateway]:
    """The sandbox gateway in a child process (so its CPU is never the bench's), until exit;
    its picture links on ``picture_origin`` if given."""
    with child_server(serve_sandbox, latency, picture_origin) as (url, pid):
        yield Gateway(url, pid)


@contextmanager
def child_server(serve: Callable[..., None], *args: Any) -> Iterator[tuple[str, int]]:
    """``serve(*args, url_out, stop)`` in a spawned process for the block: it sends its URL on
    ``url_out`` and serves until ``stop`` is set. Yields that URL and the process id."""
    context = multiprocessing.get_context("spawn")
    url_in, url_out = context.Pipe(duplex=False)
    stop = context.Event()
    server = context.Process(target=serve, args=(*args, url_out, stop))
    server.start()
    try:
        assert server.pid is not None
        yield url_in.recv(), server.pid
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()


def serve_sandbox(
    latency: float, picture_origin: str | None, url_out: Connection, stop: StopEvent
) -> None:
    """Child process: run the sandbox gateway on loopback until ``stop`` is set."""

    async def serve() -> None:
        sandbox = Sandbox(latency=latency, picture_origin=picture_origin)
        url_out.send(await sandbox.start("127.0.0.1", 0))
        try:
            await asyncio.to_thread(stop.wait)
        finally:
            await sandbox.close()

    asyncio.run(serve())


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


async def loop_ticker(stop: asyncio.Event) -> float:
    """Worst lateness, in seconds, of a 10 ms ``asyncio.sleep`` while the batch runs."""
    worst = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(TICK_SECONDS)
        worst = max(worst, time.perf_counter() - started - TICK_SECONDS)
    return worst


def imagebot_client(transport: str, connections: int) -> httpx.AsyncClient:
    """The bot's own gateway client, or plain httpx (httpcore's pool) for comparison."""
    if transport == "httpcore":
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(limits=limits, timeout=120)
    return gateway_client(connections)


async def imagebot_batch(
    gateway: Gateway, count: int, request: GenerateRequest, transport: str, connections: int
) -> Batch:
    """Warm up, then time ``count`` concurrent ``ImageService.generate`` calls."""
    async with imagebot_client(transport, connections) as http:
        payer = X402Payer(http, Wallet.create(), max_micro=1_000_000)
        service = ImageService(http, payer, gateway.url)
        for _ in range(WARMUP_REQUESTS):
            await service.generate(request)
        # One unmeasured batch of the same size opens the pool's connections.
        await asyncio.gather(*(service.generate(request) for _ in range(count)))
        before = await asyncio.to_thread(gateway.settled)
        gc.collect()
        stop = asyncio.Event()
        ticker = asyncio.create_task(loop_ticker(stop))
        await asyncio.sleep(TICK_SECONDS * 2)  # let the ticker take its first tick
        sandbox_start = gateway.cpu_seconds()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(service.generate(request) for _ in range(count)), return_exceptions=True
        )
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        sandbox_cpu = gateway.cpu_seconds() - sandbox_start
        stop.set()
        worst_lag = await ticker
        after = await asyncio.to_thread(gateway.settled)
    name = "imagebot" if transport == "shipped" else f"imagebot+{transport}"
    return batch_of(name, results, after - before, cpu, wall, worst_lag, sandbox_cpu)


def batch_of(
    client: str,
    outcomes: list[Any],
    settled: int,
    cpu: float,
    wall: float,
    worst_lag: float,
    sandbox_cpu: float,
) -> Batch:
    """Summarise one measured batch; outcomes that are exceptions count as failures."""
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    return Batch(
        client=client,
        count=len(outcomes),
        ok=len(outcomes) - len(errors),
        settled=settled,
        cpu_seconds=cpu,
        wall_seconds=wall,
        worst_lag_seconds=worst_lag,
        sandbox_cpu_seconds=sandbox_cpu,
        first_error=describe(errors[0]) if errors else None,
    )


def thread_ticker(stop: threading.Event, worst: list[float]) -> None:
    """Worst lateness of a 10 ms ``time.sleep`` in a thread (GIL contention), into worst[0]."""
    while not stop.is_set():
        started = time.perf_counter()
        time.sleep(TICK_SECONDS)
        worst[0] = max(worst[0], time.perf_counter() - started - TICK_SECONDS)


def sdk_batch(gateway: Gateway, count: int, request: GenerateRequest) -> Batch:
    """Warm up, then time ``count`` concurrent ``ImageClient.generate`` calls in threads."""
    from blockrun_llm import ImageClient

    key = "0x" + bytes(Account.create().key).hex()
    # One client per worker: an ImageClient's httpx.Client pool holds 100 connections, so a
    # shared one would cap the SDK below the level being measured.
    clients = [ImageClient(private_key=key, api_url=gateway.url) for _ in range(count)]

    def generate(client: Any) -> Any:
        return client.generate(
            request.prompt, model=request.model.id, size=request.size, n=request.n
        )

    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            for _ in range(WARMUP_REQUESTS):
                generate(clients[0])
            list(pool.map(generate, clients))  # starts the threads and opens the connections
            before = gateway.settled()
            gc.collect()
            sandbox_start = gateway.cpu_seconds()
            cpu, wall, worst_lag, outcomes = run_threads(pool, generate, clients)
            sandbox_cpu = gateway.cpu_seconds() - sandbox_start
            after = gateway.settled()
    finally:
        for client in clients:
            client.close()
    return batch_of("blockrun-llm", outcomes, after - before, cpu, wall, worst_lag, sandbox_cpu)


def run_threads(
    pool: ThreadPoolExecutor, generate: Callable[[Any], Any], clients: list[Any]
) -> tuple[float, float, float, list[Any]]:
    """One call per client at once: (cpu s, wall s, worst thread-ticker lag s, outcomes)."""
    stop, worst = threading.Event(), [0.0]
    ticker = threading.Thread(target=thread_ticker, args=(stop, worst), daemon=True)
    ticker.start()
    time.sleep(TICK_SECONDS * 2)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    futures = [pool.submit(generate, client) for client in clients]
    outcomes = [future.exception() or future.result() for future in futures]
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    stop.set()
    ticker.join()
    return cpu, wall, worst[0], outcomes


def sdk_missing() -> str | None:
    """Why the SDK phase cannot run, or None when it can."""
    try:
        import blockrun_llm  # noqa: F401
    except ImportError as error:
        return f"blockrun-llm is not installed ({error}); pip install blockrun-llm to compare"
    return None


def installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(batch: Batch, latency: float) -> None:
    lag_kind = "event-loop" if batch.client.startswith("imagebot") else "thread-tick"
    print(
        f"  {batch.client:<17} CPU {batch.cpu_ms_per_request:6.2f} ms/req "
        f"({batch.cpu_seconds:5.2f} s)  wall {batch.wall_seconds:6.3f} s "
        f"= {batch.wall_seconds / latency:5.2f}x ideal  "
        f"worst {lag_kind} lag {batch.worst_lag_seconds * 1000:6.1f} ms  "
        f"settled {batch.settled}/{batch.count} (ok {batch.ok})  "
        f"[sandbox CPU {batch.sandbox_cpu_seconds / batch.count * 1000:.2f} ms/req]"
    )
    if batch.first_error:
        print(f"    first error: {batch.first_error}")


def verdicts(batch: Batch, latency: float) -> None:
    """The issue's targets for imagebot at this level."""
    checks = [
        (f"CPU <= {TARGET_CPU_MS:g} ms/req", batch.cpu_ms_per_request <= TARGET_CPU_MS),
        (f"loop lag < {TARGET_LAG_MS:g} ms", batch.worst_lag_seconds * 1000 < TARGET_LAG_MS),
        ("all settled", batch.ok == batch.count == batch.settled),
    ]
    if batch.count == 50:
        ratio = batch.wall_seconds / latency
        checks.append((f"wall <= {TARGET_WALL_RATIO_AT_50:g}x", ratio <= TARGET_WALL_RATIO_AT_50))
    marks = "; ".join(f"{name} {'ok' if met else 'MISSED'}" for name, met in checks)
    print(f"  {batch.client} targets: {marks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="50,500", help="comma-separated concurrency levels")
    parser.add_argument("--latency", type=float, default=0.2, help="sandbox latency, seconds")
    parser.add_argument(
        "--transport",
        default="shipped",
        choices=("shipped", "httpcore", "both"),
        help="imagebot's HTTP client: as shipped (httpx over aiohttp), plain httpx, or both",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=GATEWAY_CONNECTIONS,
        help="imagebot's connection cap (shipped: %(default)s)",
    )
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    transports = ["shipped", "httpcore"] if args.transport == "both" else [args.transport]
    command = parse(COMMAND)
    assert isinstance(command, ImageCommand)
    request = command.build()
    assert isinstance(request, GenerateRequest)

    with sandbox_process(args.latency) as gateway:
        skip = sdk_missing()
        print(
            f"sandbox {gateway.url} in process {gateway.pid}, latency {args.latency} s; "
            f"{COMMAND!r} -> {request.model.id} {request.size} as a data URI; per level and "
            f"client: {WARMUP_REQUESTS} warm-up requests and one unmeasured batch, then the "
            "measured batch; CPU is the bench process's own"
        )
        print("versions: " + ", ".join(f"{name} {installed(name)}" for name in PACKAGES))
        if skip:
            print(f"SKIP blockrun-llm: {skip}")
        for count in levels:
            print(f"\n{count} concurrent paid requests")
            ours = [
                asyncio.run(imagebot_batch(gateway, count, request, transport, args.connections))
                for transport in transports
            ]
            for batch in ours:
                report(batch, args.latency)
            theirs = None
            if skip is None:
                try:
                    theirs = sdk_batch(gateway, count, request)
                except Exception as error:
                    print(f"  blockrun-llm could not run against the sandbox: {describe(error)}")
            if theirs is not None:
                report(theirs, args.latency)
                for batch in ours:
                    print(
                        f"  {batch.client} / blockrun-llm: CPU per request "
                        f"{batch.cpu_seconds / theirs.cpu_seconds:.2f}x, "
                        f"wall {batch.wall_seconds / theirs.wall_seconds:.2f}x"
                    )
            for batch in ours:
                verdicts(batch, args.latency)
        print(f"\nsandbox settled {gateway.settled()} payments in all (warm-ups included)")


if __name__ == "__main__":
    main()
