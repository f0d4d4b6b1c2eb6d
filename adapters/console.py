"""The console adapter: a chat on the terminal as user ``console:local``, an admin.

Images are written to ``./out/`` and their paths printed. ``--image PATH`` attaches a
local file; only here, because the console's user is the local operator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from bot.commands import take_image_paths
from bot.errors import UsageError
from bot.images import Picture
from bot.service import ImageBot, Sender

CONSOLE_USER = Sender("console", "local", "console", ("local",), private=True)
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ConsoleChat:
    """Prints answers and saves pictures under ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self._out_dir = out_dir

    async def send_text(self, text: str) -> None:
        print(text, flush=True)

    async def show_progress(self, status: str) -> None:
        print(status, flush=True)

    async def send_pictures(self, pictures: Sequence[Picture], caption: str) -> None:
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
        attachments = await asyncio.to_thread(_read_files, paths)
    except UsageError as error:
        await chat.send_text(error.user_message)
        return False
    if not text.strip().startswith("/"):
        text = "/imagegen " + text  # a bare line on the console is a prompt
    outcome = await bot.handle(CONSOLE_USER, chat, text, attachments)
    if outcome is None:
        await chat.send_text("Unknown command. Try /help.")
        return False
    return outcome


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


def _read_files(paths: list[str]) -> tuple[bytes, ...]:
    files = []
    for name in paths:
        path = Path(name).expanduser()
        try:
            files.append(path.read_bytes())
        except OSError as error:
            raise UsageError(f"Can't read {name}: {error.strerror or error}.") from None
    return tuple(files)
