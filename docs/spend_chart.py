"""Draw docs/spend-chart.png, the README's example of ``/spend all``'s chart, from the sandbox.

Thirty days of commands from six users go through the real bot (ledger, x402 payer, image
service) against the sandbox gateway, each day on the ledger's clock; the chart is then drawn
from the ledger as ``/spend all`` draws it. Run: ``python docs/spend_chart.py``.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.balance import WalletWatch
from bot.chains import BASE_SEPOLIA
from bot.chart import DaySpend, spend_chart
from bot.config import load_settings
from bot.http import gateway_client
from bot.images import ImageService
from bot.ledger import SqliteLedger
from bot.ledger.journal import SettlementJournal
from bot.metrics import Metrics
from bot.service import ImageBot, Sender
from bot.x402 import Wallet, X402Payer
from sandbox import Sandbox

OUT = Path(__file__).with_name("spend-chart.png")
DAYS = 30
USERS = {"@alice": 6, "@bob": 3, "@carol": 2, "@dave": 1, "@erin": 1, "@frank": 1}  # per day
MODELS = ("nano-banana", "flux", "gpt-image", "dall-e-3", "banana-pro")


class Quiet:
    """A chat that shows nothing: only the ledger matters here."""

    def reply_address(self) -> str:
        return "{}"

    async def send_text(self, text: str) -> None:
        print(text)

    async def show_progress(self, status: str, buttons: object = ()) -> None:
        pass

    async def send_pictures(self, pictures: object, caption: str, buttons: object = ()) -> None:
        pass


async def main() -> None:
    rng = random.Random(7)
    last_day = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    clock = [last_day]
    gateway = Sandbox(job_seconds=0.0)
    await gateway.start()
    with tempfile.TemporaryDirectory() as folder:
        database = Path(folder) / "ledger.sqlite3"
        settings = load_settings(
            _env_file=None, image_api_url=gateway.url, database_path=database,
            user_daily_limit_usd="5", global_daily_limit_usd="100",
        )  # fmt: skip
        async with (
            await SqliteLedger.open(database, clock=lambda: clock[0]) as ledger,
            gateway_client() as http,
        ):
            journal = SettlementJournal(ledger, SettlementJournal.beside(database))
            payer = X402Payer(http, Wallet.create(), max_micro=settings.max_micro_per_request)
            images = ImageService(http, payer, gateway.url, poll_interval=0.01)
            watch = WalletWatch(None, BASE_SEPOLIA, None, ledger)
            bot = ImageBot(settings, images, ledger, journal, watch, Metrics())
            for back in range(DAYS - 1, -1, -1):
                clock[0] = last_day - timedelta(days=back)
                for number, (name, per_day) in enumerate(USERS.items()):
                    sender = Sender("telegram", str(100 + number), name, ("1",), True, name[1:])
                    for _ in range(rng.randint(0, 2 * per_day)):
                        model = rng.choice(MODELS)
                        await bot.handle(sender, Quiet(), f"/imagegen -m {model} a fox")
            rows = [
                DaySpend(total.day, total.key, total.micro)
                for total in await ledger.daily_spend((last_day - timedelta(days=DAYS - 1)).date())
            ]
            await journal.close()
    await gateway.close()
    title = f"Spend by user, last {DAYS} days"
    OUT.write_bytes(spend_chart(rows, last_day=last_day.date(), days=DAYS, title=title))
    print(f"wrote {OUT} ({len(rows)} user-days)")


if __name__ == "__main__":
    asyncio.run(main())
