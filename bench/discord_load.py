"""Many Discord users send ``/imagegen`` at once to ``imagebot run``, as messages and as slash
commands: its CPU, memory and delays.

Run: ``.venv/bin/python bench/discord_load.py`` (``--users 200 --latency 1.0
--results small,large --kinds message,slash``). Linux only: the bot's CPU and peak memory come
from ``/proc/<pid>``. The bot is the shipped command in its own process, connected to the fake
Discord (``tests/fake_discord.py``: REST and the gateway websocket, in this process) and paying
the sandbox gateway (in a child process), so neither fake is counted as the bot's. Each result
size gets a fresh bot process. Exits 1 when any target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from paid_requests import Gateway, sandbox_process
from telegram_load import (
    SCENARIOS,
    STATUS_PREFIXES,
    BotProcess,
    CpuTrail,
    Outcome,
    Scenario,
    Watcher,
    bot_command,
    bot_environment,
    holdings,
    load_parser,
    percentile,
    quiet_collector,
    report_floor,
    rounds,
    scenario_names,
    settlement_times,
    spawn_bot,
    summary,
    until,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fake_discord import ACK_WINDOW, Call, Channel, FakeDiscord, Interaction, User  # noqa: E402

KINDS = ("message", "slash")
POLL_SECONDS = 0.02
READY_TIMEOUT = 60.0
PICTURE_ROUTES = ("create_message", "edit_original_response", "create_followup")


@dataclass(frozen=True)
class Command:
    """One user's command: a message or a slash command, in the user's own DM channel."""

    kind: str
    user: User
    channel: Channel
    sent_at: float  # time.monotonic() when the fake dispatched it on the gateway
    interaction: Interaction | None = None  # a slash command's


@dataclass
class DiscordOutcome(Outcome):
    """What one result size measured, with Discord's own figures: per kind, and deferrals."""

    added_by_kind: dict[str, list[float]] = field(default_factory=dict)
    acks: list[float] = field(default_factory=list)  # slash: seconds from creation to deferral
    unacked: int = 0
    replaced: int = 0  # slash pictures a later edit took away (checked after the bot stopped)
    rest_calls: Counter[str] = field(default_factory=Counter)  # for the batch's commands
    rss_end_mb: float = 0.0

    def rows(self) -> list[tuple[str, str, str, bool | None]]:
        rows: list[tuple[str, str, str, bool | None]] = []
        for row in super().rows():
            rows.append(row)
            if row[0] == "added latency p50 / p99":
                for kind, added in self.added_by_kind.items():
                    rows.append((f"  of which {kind}", milliseconds(added), "-", None))
        if self.acks or self.unacked:
            slowest = f"{max(self.acks, default=0.0) * 1000:.0f} ms"
            if self.unacked:
                slowest += f", {self.unacked} never"
            window = f"< {ACK_WINDOW:g} s"
            met = not self.unacked and max(self.acks, default=0.0) < ACK_WINDOW
            rows.append(("slash deferral, slowest", slowest, window, met))
            kept = self.photos_of("slash") - self.replaced
            rows.append(
                (
                    "slash pictures kept",
                    f"{kept}/{self.photos_of('slash')}",
                    "all",
                    not self.replaced,
                )
            )
        return rows

    def photos_of(self, kind: str) -> int:
        return len(self.added_by_kind.get(kind, []))


class Tracker(Watcher):
    """Follows the bot's REST calls for a set of commands, scanning ``sent`` as it grows."""

    def __init__(self, fake: FakeDiscord) -> None:
        super().__init__()
        self.fake = fake
        self.index = len(fake.sent)
        self.kind_of: dict[int, str] = {}  # channel id -> its command's kind
        self.channel_of: dict[int, int] = {}  # interaction id -> channel id
        self.photos: dict[int, Call] = {}  # by channel
        self.replies: dict[int, Call] = {}  # answers other than a status or a picture: errors
        self.statuses: set[int] = set()  # message commands' channels with a status reply
        self.deleted: set[int] = set()
        self.failed: dict[str, int] = {}
        self.routes: Counter[str] = Counter()

    def expect(self, commands: list[Command]) -> None:
        for command in commands:
            self.kind_of[command.channel.id] = command.kind
            if command.interaction is not None:
                self.channel_of[command.interaction.id] = command.channel.id

    def scan(self) -> None:
        sent = self.fake.sent
        while self.index < len(sent):
            call = sent[self.index]
            self.index += 1
            channel = self.channel_of.get(call.interaction_id or 0, call.channel_id)
            if channel is None or channel not in self.kind_of:
                continue
            self.routes[call.name] += 1
            if not call.ok:
                self.failed[call.name] = self.failed.get(call.name, 0) + 1
            elif call.name == "delete_message":
                self.deleted.add(channel)
            elif call.name in PICTURE_ROUTES and call.files:
                self.photos.setdefault(channel, call)
            elif call.name in PICTURE_ROUTES:
                if not content(call).startswith(STATUS_PREFIXES):
                    self.replies.setdefault(channel, call)
                elif call.name == "create_message":
                    self.statuses.add(channel)

    @property
    def done(self) -> bool:
        """Every command has its picture (or an error reply) and no status message is left."""
        answered = self.photos.keys() | self.replies.keys()
        return answered >= self.kind_of.keys() and self.deleted >= self.statuses

    def shortfall(self, limit: float) -> str:
        missing = len(self.kind_of.keys() - self.photos.keys() - self.replies.keys())
        return (
            f"{missing} of {len(self.kind_of)} commands got no answer in {limit:g} s "
            f"({len(self.statuses - self.deleted)} status messages left)"
        )


def content(call: Call) -> str:
    payload = call.payload if isinstance(call.payload, dict) else {}
    return str(payload.get("content") or "")


def milliseconds(added: list[float]) -> str:
    if not added:
        return "-"
    return f"{percentile(added, 0.5) * 1000:.0f} / {percentile(added, 0.99) * 1000:.0f} ms"


def slash_options(command: str) -> dict[str, str]:
    """``/imagegen -m MODEL PROMPT`` as the slash command's options (what a user would pick)."""
    words = command.split(" ", 1)[1]
    if words.startswith("-m "):
        model, prompt = words[3:].split(" ", 1)
        return {"prompt": prompt, "model": model}
    return {"prompt": words}


async def start_bot(
    fake: FakeDiscord, gateway: Gateway, home: Path, jobs: int | None
) -> BotProcess:
    """Start ``imagebot run`` in ``home``; wait for its gateway session and its slash commands."""
    platform = {"DISCORD_BOT_TOKEN": fake.token, "DISCORD_API_URL": fake.api_url}
    if jobs is not None:
        platform["MAX_CONCURRENT_JOBS"] = str(jobs)
    bot = await spawn_bot(home, bot_environment(gateway, home, platform))
    try:
        await until(lambda: fake.command_syncs > 0, bot, "the slash commands")
        await until(lambda: any(not s.ended and s.connection for s in fake.sessions), bot, "READY")
    except BaseException:
        await bot.stop()
        raise
    return bot


def send(fake: FakeDiscord, kind: str, user: User, command: str) -> Command:
    """``user`` sends ``command`` in their DM with the bot, as a message or a slash command."""
    channel = fake.dm(user)
    if kind == "message":
        fake.send_message(channel, user, command)
        return Command(kind, user, channel, fake.clock())
    name = command.split(" ", 1)[0].removeprefix("/")
    interaction = fake.slash_command(channel, user, name, slash_options(command))
    return Command(kind, user, channel, interaction.created_at, interaction)


async def warm_up(fake: FakeDiscord, bot: BotProcess, command: str, kinds: list[str]) -> None:
    """One command of each kind from users outside the batch: imports, connections, the
    sandbox's render cache."""
    for kind in kinds:
        tracker = Tracker(fake)
        tracker.expect([send(fake, kind, fake.user(f"warmup_{kind}"), command)])
        await tracker.wait(bot, READY_TIMEOUT)
        if not tracker.photos:
            raise RuntimeError(f"the warm-up {kind} command got no picture: {tracker.replies}")


async def run_scenario(
    scenario: Scenario, args: argparse.Namespace, gateway: Gateway, kinds: list[str]
) -> DiscordOutcome:
    """A fresh fake and bot; warm up; ``users`` commands at once; measure; SIGTERM."""
    outcome = DiscordOutcome(scenario, args.users, args.latency)
    fake = FakeDiscord()
    await fake.start()
    try:
        with tempfile.TemporaryDirectory(prefix="imagebot-load-") as directory:
            home = Path(directory)
            bot = await start_bot(fake, gateway, home, args.jobs)
            print(f"  bot pid {bot.pid}: {' '.join(bot_command())} (cwd {home})", flush=True)
            commands: list[Command] = []
            try:
                commands = await measure(fake, bot, outcome, gateway, kinds, args.timeout)
            except (RuntimeError, TimeoutError) as error:
                outcome.problem = str(error)
            finally:
                with contextlib.suppress(OSError):
                    outcome.peak_rss_mb = bot.memory_mb("VmHWM")
                outcome.exit_code = await bot.stop()
                if outcome.problem or outcome.exit_code != 0:
                    print(f"  the bot's log:\n{bot.tail()}")
            outcome.replaced = sum(1 for command in commands if replaced(command))
    finally:
        await fake.close()
    return outcome


def replaced(command: Command) -> bool:
    """A slash command whose answer, now that the bot has stopped, no longer shows its picture
    (a status edit that landed after it)."""
    interaction = command.interaction
    if interaction is None or interaction.original is None:
        return False
    original = interaction.original
    shown = str(original.get("content") or "")
    return not original.get("attachments") or shown.startswith(STATUS_PREFIXES)


async def measure(
    fake: FakeDiscord,
    bot: BotProcess,
    outcome: DiscordOutcome,
    gateway: Gateway,
    kinds: list[str],
    limit: float,
) -> list[Command]:
    command = outcome.scenario.command
    await warm_up(fake, bot, command, kinds)
    users = [fake.user(f"user{number}") for number in range(1, 1 + outcome.users)]
    tracker = Tracker(fake)
    trail = CpuTrail(bot, gateway)
    settled_before = len(await asyncio.to_thread(settlement_times, gateway))
    clock = time.time() - time.monotonic()  # the sandbox stamps settlements with time.time()
    outcome.baseline_rss_mb = bot.memory_mb("VmRSS")
    with quiet_collector():
        sandbox_start, fake_start = gateway.cpu_seconds(), time.process_time()
        user_start, system_start = bot.cpu()
        started = time.monotonic()
        commands = [
            send(fake, kinds[n % len(kinds)], user, command) for n, user in enumerate(users)
        ]
        tracker.expect(commands)
        try:
            await tracker.wait(bot, limit, trail)
        finally:
            user_end, system_end = bot.cpu()
            trail.sample()
            with contextlib.suppress(OSError):
                outcome.rss_end_mb = bot.memory_mb("VmRSS")
        outcome.fake_cpu = time.process_time() - fake_start
    outcome.sandbox_cpu = gateway.cpu_seconds() - sandbox_start
    outcome.cpu_user, outcome.cpu_system = user_end - user_start, system_end - system_start
    settled_at = [
        moment - clock
        for moment in (await asyncio.to_thread(settlement_times, gateway))[settled_before:]
    ]
    photos = tracker.photos
    outcome.settled = len(settled_at)
    outcome.after_first = trail.after(min(settled_at), started) if settled_at else None
    outcome.photos = len(photos)
    outcome.chats = len(photos)  # kept by DM channel, one per user
    outcome.error_replies = len(tracker.replies)
    outcome.failed_calls = tracker.failed
    outcome.rest_calls = tracker.routes
    outcome.photo_bytes = [sum(len(upload.data) for upload in c.files) for c in photos.values()]
    if photos:
        outcome.wall = max(call.at for call in photos.values()) - started
    # holdings() reads only the tracker's RSS samples, which this Tracker keeps alike.
    sent = [call.at for call in photos.values()]
    holdings(outcome, started, settled_at, sent, tracker)  # type: ignore[arg-type]
    outcome.added_by_kind = {kind: [] for kind in kinds}
    for each in commands:
        photo = photos.get(each.channel.id)
        if photo is not None:
            added = photo.at - each.sent_at - outcome.latency
            outcome.added.append(added)
            outcome.added_by_kind[each.kind].append(added)
        if each.interaction is not None:
            delay = each.interaction.ack_delay
            if delay is None:
                outcome.unacked += 1
            else:
                outcome.acks.append(delay)
    return commands


def report(outcome: DiscordOutcome) -> None:
    users, latency = outcome.users, outcome.latency
    sizes = outcome.photo_bytes
    size = f"{sum(sizes) / len(sizes) / 1024:,.0f} KB PNG" if sizes else "no PNG"
    print(
        f"  pictures {outcome.photos}/{users} in {outcome.chats} DMs ({size} each), "
        f"error replies {outcome.error_replies}, refused REST calls "
        f"{outcome.failed_calls or 'none'}, sandbox settled {outcome.settled}/{users}"
    )
    print(
        f"  bot CPU {outcome.cpu_ms:6.2f} ms/command (user {outcome.cpu_user:.2f} s + system "
        f"{outcome.cpu_system:.2f} s for {users})   peak RSS {outcome.peak_rss_mb:.0f} MB "
        f"(RSS {outcome.baseline_rss_mb:.0f} MB before the batch, "
        f"{outcome.rss_end_mb:.0f} MB at its end)"
    )
    if outcome.added:
        added = outcome.added
        by_kind = "; ".join(
            f"{kind} {milliseconds(values)} ({len(values)})"
            for kind, values in outcome.added_by_kind.items()
        )
        print(
            f"  wall {outcome.wall:.2f} s = {outcome.wall / latency:.2f}x the ideal {latency:g} s;"
            f" added latency p50 {percentile(added, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(added, 0.99) * 1000:.0f} ms, max {max(added) * 1000:.0f} ms "
            f"({len(added)} users): p50 / p99 {by_kind}"
        )
    if outcome.acks or outcome.unacked:
        acks = outcome.acks
        print(
            f"  slash deferrals (Discord's window {ACK_WINDOW:g} s): p50 "
            f"{percentile(acks, 0.5) * 1000:.0f} ms, max {max(acks) * 1000:.0f} ms, never "
            f"{outcome.unacked}; pictures a later status edit replaced: {outcome.replaced}"
            if acks
            else f"  slash deferrals: none of {outcome.unacked} acknowledged"
        )
    calls = sum(outcome.rest_calls.values())
    routes = ", ".join(f"{name} {count}" for name, count in outcome.rest_calls.most_common())
    print(f"  REST calls {calls / users:.1f} per command ({routes})")
    print(
        f"  results held at once (paid answers out of the sandbox, pictures not yet at the fake): "
        f"at most {outcome.most_held}; sampled RSS highest {outcome.rss_top_mb:.0f} MB at "
        f"+{outcome.rss_top_at:.1f} s, holding {outcome.held_at_rss_top}"
    )
    print(
        f"  [fake Discord CPU {outcome.fake_cpu / users * 1000:.2f} ms/command, "
        f"sandbox CPU {outcome.sandbox_cpu / users * 1000:.2f} ms/command; not the bot's]"
    )
    report_floor(outcome, "fake Discord")
    if outcome.problem:
        print(f"  PROBLEM: {outcome.problem}")


async def run(args: argparse.Namespace, gateway: Gateway, names: list[str]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    for name in rounds(args.runs, names):
        scenario = SCENARIOS[name]
        print(
            f"\n{name}: {args.users} users send {scenario.command!r} at once "
            f"({' / '.join(kinds)} in turn)",
            flush=True,
        )
        outcome = await run_scenario(scenario, args, gateway, kinds)
        report(outcome)
        outcomes.append(outcome)
    return outcomes


def main() -> int:
    parser = load_parser(__doc__)
    parser.add_argument(
        "--kinds", default="message,slash", help="comma-separated, given to users in turn"
    )
    parser.add_argument(
        "--jobs", type=int, help="MAX_CONCURRENT_JOBS for the bot (default: unset, as shipped)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for every picture (default 120 + users x latency)",
    )
    args = parser.parse_args()
    names = scenario_names(parser, args)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    if not kinds or any(kind not in KINDS for kind in kinds):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    if args.timeout is None:
        args.timeout = 120 + args.users * args.latency

    with sandbox_process(args.latency) as gateway:
        print(
            f"sandbox {gateway.url} in process {gateway.pid}, latency {args.latency:g} s; fake "
            f"Discord (REST and gateway) in this process; per size a fresh `imagebot run` "
            f"(MAX_CONCURRENT_JOBS {args.jobs or 'as shipped'}), one warm-up command per kind, "
            f"then {args.users} users at once, each in their DM. CPU and RSS are the bot "
            f"process's own (/proc)."
        )
        outcomes = asyncio.run(run(args, gateway, names))
    return 0 if summary(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
