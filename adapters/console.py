"""The console adapter: a chat on the terminal as user ``console:local``, an admin.

Images are written to ``./out/`` and their paths printed. ``--image PATH`` attaches a
local file; only here, because the console's user is the local operator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from bot.buttons import Button
from bot.commands import tokens
from bot.errors import InputUnavailable, UsageError
from bot.images import Picture, ResultPicture, in_memory
from bot.requests import ImageInput
from bot.service import ImageBot, Outcome, Sender

CONSOLE_USER = Sender("console", "local", "console", ("local",), private=True)
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ConsoleChat:
    """Prints answers and saves pictures under ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self._out_dir = out_dir

    def reply_address(self) -> str:
        return "{}"  # a terminal session does not outlive its run

    async def send_text(self, text: str) -> None:
        print(text, flush=True)

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        print(status, flush=True)  # a terminal has no buttons: /cancel works there

    async def send_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        pictures = await in_memory(pictures)
        paths = await asyncio.to_thread(self._save, pictures)
        print(caption, flush=True)
        for path, picture in zip(paths, pictures, strict=True):
            print(f"saved {path} ({picture.width}x{picture.height})", flush=True)

    def _save(self, pictures: Sequence[Picture]) -> list[Path]:
        self._out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for index, picture in enumerate(pictures, 1):
            path = self._out_dir / f"image-{stamp}-{time.time_ns() % 10**6:06d}-{index}"
            path = path.with_suffix("." + _EXTENSIONS[picture.mime])
            path.write_bytes(picture.data)
            paths.append(path)
        return paths


async def run_command(bot: ImageBot, chat: ConsoleChat, line: str) -> bool:
    """Run one console line; True when it succeeded."""
    try:
        text, paths = take_image_paths(line)
    except UsageError as error:
        await chat.send_text(error.user_message)
        return False
    if not text.strip().startswith("/"):
        text = "/imagegen " + text  # a bare line on the console is a prompt
    outcome = await bot.handle(CONSOLE_USER, chat, text, partial(_read_files, paths))
    if outcome is Outcome.IGNORED:
        await chat.send_text("Unknown command. Try /help.")
    return outcome is Outcome.DONE


def take_image_paths(text: str) -> tuple[str, list[str]]:
    """Split console-only ``--image PATH`` flags out of a command line.

    Returns the text without them (everything else untouched) and the paths in order.
    Only the console, whose user is the local operator, may read named files.
    """
    spans = tokens(text)
    cuts: list[tuple[int, int]] = []
    paths: list[str] = []
    index = 0
    while index < len(spans):
        token, start, end = spans[index]
        if token == "--":
            break
        if token.startswith("--image="):
            paths.append(token.removeprefix("--image="))
            cuts.append((start, end))
        elif token == "--image":
            if index + 1 >= len(spans):
                raise UsageError("--image needs a file path, e.g. --image ~/photo.png")
            paths.append(spans[index + 1][0])
            cuts.append((start, spans[index + 1][2]))
            index += 1
        index += 1
    for start, end in reversed(cuts):
        text = text[:start] + text[end:]
    return text, paths


async def run_console(bot: ImageBot, out_dir: Path, once: str | None = None) -> int:
    """The interactive loop, or one command with ``once``; returns the exit code."""
    chat = ConsoleChat(out_dir)
    if once is not None:
        return 0 if await run_command(bot, chat, once) else 1
    print("imagebot console: type /help, /imagegen PROMPT, or Ctrl-D to quit.", flush=True)
    while True:
        try:
            line = await asyncio.to_thread(input, "> ")
        except EOFError:
            print(flush=True)
            return 0
        if line.strip():
            await run_command(bot, chat, line)


async def _read_files(paths: list[str]) -> tuple[ImageInput, ...]:
    return await asyncio.to_thread(_read_all, paths)


def _read_all(paths: list[str]) -> tuple[ImageInput, ...]:
    files = []
    for name in paths:
        path = Path(name).expanduser()
        try:
            files.append(ImageInput(path.read_bytes(), str(path)))
        except OSError as error:
            raise InputUnavailable(f"Can't read {name}: {error.strerror or error}.") from None
    return tuple(files)
