"""Logging for the whole process, with secrets kept out."""

from __future__ import annotations

import logging

# Keeps secrets out of logs: httpx logs each request URL at INFO, and Telegram's carries the token.
_QUIET_LOGGERS = ("httpx", "httpcore", "aiohttp.access")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
