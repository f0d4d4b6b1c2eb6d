"""`imagebot run` writes log lines from a thread: a stalled stderr never stops the event loop."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from imagebot.logs import logging_in_a_thread

log = logging.getLogger("imagebot.test")


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a blocking write to it waits until someone reads."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    for size in (65536, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write, b"x" * size)
    os.set_blocking(write, True)
    return read, write


class Drain:
    """Reads the pipe to its end in a thread once started: by ``start``, or by itself after
    ``give_up_after`` seconds, so a blocked test ends (and fails) rather than hangs."""

    def __init__(self, read: int, give_up_after: float) -> None:
        self.read = read
        self.text = b""
        self.started = threading.Event()
        self.gave_up = False
        self._thread = threading.Thread(target=self._run, args=(give_up_after,), daemon=True)
        self._thread.start()

    def start(self) -> None:
        self.started.set()

    def join(self) -> None:
        self._thread.join()

    def _run(self, give_up_after: float) -> None:
        self.gave_up = not self.started.wait(give_up_after)
        while chunk := os.read(self.read, 65536):
            self.text += chunk
        os.close(self.read)


async def test_a_stalled_stderr_holds_up_log_lines_and_drops_the_excess_not_the_loop() -> None:
    read, write = full_pipe()
    stream = os.fdopen(write, "w", buffering=1)
    stalled = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(stalled)
    drain = Drain(read, give_up_after=10)
    try:
        with logging_in_a_thread(lines=50):
            for number in range(200):  # each would block on the full pipe, written here
                log.warning("line %d", number)
            drain.start()
        assert root.handlers[-1] is stalled  # the writers are the root logger's again
    finally:
        root.removeHandler(stalled)
        stream.close()
        drain.start()
        drain.join()
    assert not drain.gave_up  # the loop logged all 200 lines while the pipe stayed full
    written = drain.text.lstrip(b"x").decode()
    assert "line 0\n" in written  # what the queue held is written once stderr moves
    assert "line 199" not in written  # past 50 waiting, lines were dropped...
    assert "log lines were dropped: stderr did not keep up" in written  # ...and counted
