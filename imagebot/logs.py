"""Logging for the whole process, with secrets kept out at every level."""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener

from pydantic import BaseModel, SecretStr

from bot.config import url_passwords

# Quieter by default: httpx logs each request URL at INFO, and Telegram's carries the token.
_QUIET_LOGGERS = ("httpx", "httpcore", "aiohttp.access")
_MASK = "[secret]"
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")  # any case, as httpx reads them
# Log lines waiting for the writing thread; past this they are dropped, and counted.
LOG_QUEUE_LINES = 10_000

log = logging.getLogger(__name__)


class _Redacting(logging.Formatter):
    """Formats as usual, then masks every secret in the line and in any traceback."""

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text


def secrets_of(settings: BaseModel) -> list[str]:
    """Every secret setting's value, a wallet key also without its ``0x``, a URL's password, and
    the password of a proxy ``HTTP(S)_PROXY`` or ``ALL_PROXY`` names."""
    values = [
        value.get_secret_value()
        for name in type(settings).model_fields
        if isinstance(value := getattr(settings, name), SecretStr)
    ]
    bare_keys = [value.removeprefix("0x") for value in values if value.startswith("0x")]
    proxies = [
        value if "://" in value else f"http://{value}"
        for name, value in os.environ.items()
        if name.upper() in _PROXY_VARIABLES
    ]
    passwords = [password for value in values + proxies for password in url_passwords(value)]
    return values + bare_keys + passwords


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log lines to stderr at ``level``; ``secrets`` never appear in them, whatever the level."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter = _Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class _Dropping(QueueHandler):
    """Hands each record to the writing thread, or drops it (counted) when that is behind."""

    def __init__(self, lines: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(QueueListener):
    """Writes queued records with the real handlers; at the end, after all the queue holds."""

    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # waits for room, where the base class would raise


@contextmanager
def logging_in_a_thread(lines: int = LOG_QUEUE_LINES) -> Iterator[None]:
    """Within the block the root logger's handlers write from a thread of their own, so a
    stderr that stalls (a full pipe, a stuck log collector) holds up log lines, never the event
    loop; past ``lines`` waiting, lines are dropped and their number logged at the end, when
    the rest is written."""
    root = logging.getLogger()
    writers = root.handlers[:]
    handler = _Dropping(queue.Queue(lines))
    listener = _Writer(handler.queue, *writers, respect_handler_level=True)
    root.handlers = [handler]
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.handlers = writers
        if handler.dropped:
            log.warning("%d log lines were dropped: stderr did not keep up", handler.dropped)
