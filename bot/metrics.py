"""What operators watch: commands, payments, gateway latency, jobs and the wallet, for Prometheus.

One ``Metrics`` per bot, each with a registry of its own, so tests and several bots in one
process never share a series. No label names a user, a chat or a prompt: the series are few and
fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CommandKind = Literal[
    "imagegen",
    "img2img",
    "spend",
    "help",
    "models",
    "cancel",
    "press",
    "link",
    "unlink",
    "wallet",
    "budget",
    "pause",
]
CommandOutcome = Literal["done", "refused", "ignored"]
PaymentStatus = Literal["settled", "failed", "unknown"]
# From a quick 402 quote to a poll or paid request that takes up to its deadline.
GATEWAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


class Metrics:
    """The bot's metrics in ``registry``: the core reports through the methods, the shell serves
    the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._commands = Counter(
            "imagebot_commands",
            "Commands handled, by kind and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._payments = Counter(
            "imagebot_payments",
            "Payments closed, by ledger status.",
            ["status"],
            registry=self.registry,
        )
        self._settled = Counter(
            "imagebot_settled_micro_usdc",
            "Micro-USDC settled by closed payments.",
            registry=self.registry,
        )
        self._gateway = Histogram(
            "imagebot_gateway_seconds",
            "Seconds per gateway HTTP exchange: a quote, a paid request, a poll.",
            buckets=GATEWAY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "imagebot_jobs_in_flight", "Image jobs being drawn now.", registry=self.registry
        )
        self._waiting = Gauge(
            "imagebot_jobs_waiting", "Image jobs waiting in line.", registry=self.registry
        )
        self._balance: Gauge | None = None
        for kind in get_args(CommandKind):  # every series from zero, so rates start at once
            for outcome in get_args(CommandOutcome):
                self._commands.labels(kind=kind, outcome=outcome)
        for status in get_args(PaymentStatus):
            self._payments.labels(status=status)

    def command_done(self, kind: CommandKind, outcome: CommandOutcome) -> None:
        """One command answered, refused or ignored."""
        self._commands.labels(kind=kind, outcome=outcome).inc()

    def payment_closed(self, status: PaymentStatus, charged_micro: int) -> None:
        """One ledger row closed; only a settled one adds its charge to the settled total."""
        self._payments.labels(status=status).inc()
        if status == "settled":
            self._settled.inc(charged_micro)

    def observe_gateway(self, seconds: float) -> None:
        """One gateway exchange took ``seconds``; fits ``ImageService``'s ``on_exchange``."""
        self._gateway.observe(seconds)

    def count_jobs(self, in_flight: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the jobs being drawn and those waiting in line from these, at each scrape."""
        self._in_flight.set_function(in_flight)
        self._waiting.set_function(waiting)

    def set_balance(self, micro: int) -> None:
        """The wallet's USDC as last read; the series exists from the first reading on."""
        if self._balance is None:
            self._balance = Gauge(
                "imagebot_wallet_balance_micro_usdc",
                "The wallet's USDC balance in micro-USDC, as last read.",
                registry=self.registry,
            )
        self._balance.set(micro)
