"""The text command parser: one chat message in, a typed command out.

Pure: no I/O. Syntax errors (an unknown flag, a flag without its value) are refused here as a
``UsageError``; the values themselves are checked by ``bot.requests.build_request``, which
Discord's slash commands use too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.errors import UsageError
from bot.money import parse_usd
from bot.principals import parse_principal
from bot.requests import ImageCommand, Kind

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201e": "\u201c", "\u2018": "\u2019"}
_COMMAND = re.compile(r"/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?=\s|$)")
_NAME = re.compile(r"^@\w{1,64}$")
_LONG_FLAG = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=.*)?$", re.DOTALL)


@dataclass(frozen=True)
class MenuEntry:
    """One command as chat menus list it (Telegram's command menu, Discord's slash commands)."""

    name: str
    description: str


MENU = (
    MenuEntry("imagegen", "Make a picture from text"),
    MenuEntry("img2img", "Edit or fuse the attached or replied-to images"),
    MenuEntry("cancel", "Stop your pictures waiting in line or still being drawn"),
    MenuEntry("models", "Models, prices and sizes"),
    MenuEntry("spend", "What you have spent and what is left today"),
    MenuEntry("link", "Share one budget with your account on the other platform"),
    MenuEntry("unlink", "Stop sharing your budget with your other account"),
    MenuEntry("help", "Usage with examples"),
)
ADMIN_MENU = (
    MenuEntry("wallet", "Admins: the wallet, its balance and today's spend"),
    MenuEntry("budget", "Admins: show or set a user's daily limit, or the default"),
    MenuEntry("pause", "Admins: stop all paid commands in every process"),
    MenuEntry("resume", "Admins: let paid commands run again"),
)


@dataclass(frozen=True)
class SpendQuery:
    """``/spend``: ``who`` is ``None`` (the caller), ``"all"``, or ``platform:id`` / ``@name``;
    ``by_model``: ``/spend all models`` (the chart stacked by model, not by user)."""

    who: str | None
    by_model: bool = False


@dataclass(frozen=True)
class Help:
    """``/help`` and ``/start``."""


@dataclass(frozen=True)
class Models:
    """``/models``."""


@dataclass(frozen=True)
class CancelJobs:
    """``/cancel``: stop the caller's own jobs that can still be stopped."""


@dataclass(frozen=True)
class LinkAccounts:
    """``/link`` (``code`` None: ask for a code) or ``/link CODE`` (redeem it)."""

    code: str | None


@dataclass(frozen=True)
class Unlink:
    """``/unlink``."""


@dataclass(frozen=True)
class WalletQuery:
    """``/wallet`` (admins)."""


@dataclass(frozen=True)
class PauseSpending:
    """``/pause`` (``paused``) or ``/resume`` (admins)."""

    paused: bool


@dataclass(frozen=True)
class BudgetChange:
    """``/budget`` (admins): ``who`` is ``platform:id``, ``@name`` or None (the default);
    ``micro`` the limit to set, or None with ``reset`` (remove it) or neither (show it)."""

    who: str | None
    micro: int | None = None
    reset: bool = False


ADMIN_COMMANDS = (WalletQuery, PauseSpending, BudgetChange)
Command = (
    ImageCommand
    | SpendQuery
    | Help
    | Models
    | CancelJobs
    | LinkAccounts
    | Unlink
    | WalletQuery
    | PauseSpending
    | BudgetChange
)

USAGE: dict[Kind, str] = {
    "imagegen": "/imagegen [--model NAME] [--size WxH] [--n N] PROMPT",
    "img2img": "/img2img [--model NAME] [--size WxH] [--mask] PROMPT (attach or reply to images)",
}


def parse(text: str, *, bot_username: str | None = None) -> Command | None:
    """Parse one chat message. ``None`` means it is not a command for this bot.

    Raises ``UsageError`` when the command is ours but cannot be read as written.
    """
    command = _command(text, bot_username)
    if command is None:
        return None
    name, rest = command
    if name in ("help", "start"):
        return Help()
    if name == "models":
        return Models()
    if name == "spend":
        return spend_query(rest)
    if name == "cancel":
        return CancelJobs()
    if name == "link":
        return LinkAccounts(rest.strip() or None)
    if name == "unlink":
        return Unlink()
    if name == "wallet":
        return WalletQuery()
    if name in ("pause", "resume"):
        return PauseSpending(name == "pause")
    if name == "budget":
        return budget_change(rest)
    if name == "imagegen" or name == "img2img":
        return _image_command(name, rest)
    return None


def spend_query(who: str) -> SpendQuery:
    """``/spend``'s argument (empty, ``all``, ``platform:id`` or ``@name``) as a query."""
    words = who.split()
    if not words:
        return SpendQuery(None)
    lowered = [word.lower() for word in words]
    if lowered in (["all", "models"], ["all", "users"]):
        return SpendQuery("all", by_model=lowered[1] == "models")
    if len(words) > 1:
        raise UsageError(
            "Use /spend, /spend all, /spend all models, or /spend USER (platform:id or @name)."
        )
    word = words[0]
    if word.lower() == "all":
        return SpendQuery("all")
    if _NAME.match(word):
        return SpendQuery(word)
    try:
        return SpendQuery(parse_principal(word))
    except ValueError:
        raise UsageError(
            f"I don't know the user {word[:40]!r}. Write it as platform:id "
            "(e.g. telegram:12345) or @name."
        ) from None


_BUDGET_USAGE = (
    "Use /budget USER AMOUNT, /budget USER, /budget USER reset or /budget default AMOUNT "
    "(USER is platform:id or @name, AMOUNT in USD such as 2.50)."
)


def budget_change(text: str) -> BudgetChange:
    """``/budget``'s arguments: who (``default`` for everyone), then an amount or ``reset``."""
    words = text.split()
    if not 1 <= len(words) <= 2:
        raise UsageError(_BUDGET_USAGE)
    who, *value = words
    target = None if who.lower() == "default" else spend_query(who).who
    if target == "all":
        raise UsageError(_BUDGET_USAGE)
    if not value:
        return BudgetChange(target)
    if value[0].lower() == "reset":
        if target is None:
            raise UsageError("The default can't be reset; set it with /budget default AMOUNT.")
        return BudgetChange(target, reset=True)
    try:
        micro = parse_usd(value[0])
    except ValueError:
        raise UsageError(f"{value[0][:20]!r} is not an amount in USD. {_BUDGET_USAGE}") from None
    return BudgetChange(target, micro)


def _command(text: str, bot_username: str | None) -> tuple[str, str] | None:
    """The command's lowercase name and the text after it, unless it is for another bot."""
    stripped = text.strip()
    match = _COMMAND.match(stripped)
    if match is None:
        return None
    addressee = match.group(2)
    if addressee and bot_username and addressee.lower() != bot_username.lower().lstrip("@"):
        return None
    return match.group(1).lower(), stripped[match.end() :]


_VALUE_FLAGS = {
    "--model": "model",
    "-m": "model",
    "--size": "size",
    "-s": "size",
    "--n": "n",
    "-n": "n",
    "--quality": "quality",
    "-q": "quality",
}


def _image_command(kind: Kind, rest: str) -> ImageCommand:
    """Take the flags out of ``rest``; the prompt is what remains, as the user wrote it."""
    spans = tokens(rest)
    values: dict[str, str] = {}
    mask = False
    kept: list[int] = []  # indexes of prompt tokens
    index = 0
    while index < len(spans):
        token = spans[index][0]
        index += 1
        if token == "--":
            kept.extend(range(index, len(spans)))
            break
        if token == "--mask":
            mask = True
            continue
        flag, has_inline, inline = token.partition("=")
        if flag in _VALUE_FLAGS and (has_inline or flag == token):
            if has_inline:
                value = inline
            elif index < len(spans):
                value = spans[index][0]
                index += 1
            else:
                value = ""
            if not value.strip():
                raise UsageError(f"{flag} needs a value. Usage: {USAGE[kind]}")
            values[_VALUE_FLAGS[flag]] = value.strip()
            continue
        if token == "--image":
            raise UsageError(
                "Attach the picture to your message or reply to it; "
                "I don't read files or links named in a command."
            )
        if _LONG_FLAG.match(token) or re.fullmatch(r"-[A-Za-z]", token):
            raise UsageError(
                f"Unknown flag {token.split('=')[0][:30]}. Usage: {USAGE[kind]} "
                "(put -- before a prompt that starts with a dash)"
            )
        kept.append(index - 1)
    return ImageCommand(kind, _prompt(rest, spans, kept), mask=mask, **values)


def _prompt(rest: str, spans: list[tuple[str, int, int]], kept: list[int]) -> str:
    """Rejoin the prompt tokens, keeping the user's own spacing between neighbours."""
    if len(kept) == 1:  # a prompt given as one quoted string loses its quotes
        return spans[kept[0]][0].strip()
    parts: list[str] = []
    for position, index in enumerate(kept):
        _, start, end = spans[index]
        if position:
            previous = kept[position - 1]
            parts.append(rest[spans[previous][2] : start] if previous == index - 1 else " ")
        parts.append(rest[start:end])
    return "".join(parts).strip()


def tokens(text: str) -> list[tuple[str, int, int]]:
    """Split on whitespace into (token, start, end); a quote opening a word runs to its close.

    Apostrophes inside words (``fox's``) and unmatched quotes stay literal, so ordinary
    prose never fails to parse.
    """
    tokens: list[tuple[str, int, int]] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char.isspace():
            index += 1
            continue
        closing = _QUOTES.get(char)
        if closing is not None:
            end = _closing_quote(text, index + 1, closing)
            if end != -1:
                tokens.append((text[index + 1 : end], index, end + 1))
                index = end + 1
                continue
        word: list[str] = []
        end = index
        while end < length and not text[end].isspace():
            closing = _QUOTES.get(text[end + 1]) if end + 1 < length else None
            if text[end] == "=" and closing is not None:  # --flag="a value"
                close = _closing_quote(text, end + 2, closing)
                if close != -1:
                    word.append(text[end : end + 1] + text[end + 2 : close])
                    end = close + 1
                    break
            word.append(text[end])
            end += 1
        tokens.append(("".join(word), index, end))
        index = end
    return tokens


def _closing_quote(text: str, start: int, closing: str) -> int:
    """Index of a closing quote that ends a word (followed by space or the end), or -1."""
    position = text.find(closing, start)
    while position != -1:
        after = position + 1
        if after == len(text) or text[after].isspace():
            return position
        position = text.find(closing, after)
    return -1
