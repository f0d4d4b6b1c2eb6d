"""Principals: one user on one platform, written ``platform:id`` (``telegram:12345``)."""

from __future__ import annotations

import re

PLATFORMS = ("telegram", "discord", "console")
CONSOLE_OPERATOR = "console:local"  # the local operator at the terminal, always an admin

_IDS = {
    "telegram": re.compile(r"^-?\d{1,20}$"),  # users are positive, group chats negative
    "discord": re.compile(r"^\d{1,20}$"),  # snowflakes
    "console": re.compile(r"^\w{1,64}$"),
}


def principal(platform: str, user_id: str) -> str:
    """The principal of ``user_id`` on ``platform``."""
    return f"{platform}:{user_id}"


def parse_principal(text: str) -> str:
    """``text`` as a principal with its platform in lowercase; ``ValueError`` says what is wrong."""
    platform, _, ident = text.strip().partition(":")
    platform = platform.lower()
    if platform not in PLATFORMS:
        raise ValueError(
            f"unknown platform in {text[:30]!r}; use {', '.join(PLATFORMS)} as in telegram:12345"
        )
    if not _IDS[platform].match(ident):
        raise ValueError(f"{text[:40]!r} is not platform:id, e.g. telegram:12345")
    return principal(platform, ident)
