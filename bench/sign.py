"""How fast the bot signs one x402 payment: ``Wallet.sign`` over a fresh intent each time.

Run: ``.venv/bin/python bench/sign.py [--iterations N] [--rounds R]``. Target: <= 0.3 ms each.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import secrets
import time

from bot.chains import BASE_SEPOLIA
from bot.x402 import PaymentIntent, Quote, Wallet
from sandbox import SANDBOX_PAY_TO

TARGET_MS = 0.3


def make_intents(wallet: Wallet, count: int) -> list[PaymentIntent]:
    """``count`` intents that differ in nonce, as ``X402Payer`` makes them."""
    quote = Quote(
        version=2,
        chain=BASE_SEPOLIA,
        amount_micro=21_000,
        pay_to=SANDBOX_PAY_TO,
        asset=BASE_SEPOLIA.usdc,
        max_timeout_seconds=300,
        requirement={},
        resource=None,
    )
    now = int(time.time())
    return [
        PaymentIntent(quote, wallet.address, "0x" + secrets.token_hex(32), now - 600, now + 300)
        for _ in range(count)
    ]


def time_round(wallet: Wallet, intents: list[PaymentIntent]) -> float:
    """Seconds to sign every intent once."""
    started = time.perf_counter()
    for intent in intents:
        wallet.sign(intent)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=5000, help="signatures per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best one counts")
    args = parser.parse_args()

    try:
        print(f"coincurve {importlib.metadata.version('coincurve')} installed")
    except importlib.metadata.PackageNotFoundError:
        print("coincurve NOT installed: bot.x402 cannot sign without it")
        raise SystemExit(1) from None

    wallet = Wallet.create()
    time_round(wallet, make_intents(wallet, 200))  # warm the domain-separator cache
    best = min(
        time_round(wallet, make_intents(wallet, args.iterations)) for _ in range(args.rounds)
    )
    per_sign_ms = best / args.iterations * 1000
    verdict = "meets" if per_sign_ms <= TARGET_MS else "MISSES"
    print(
        f"Wallet.sign: {args.iterations / best:,.0f} signatures/s, "
        f"{per_sign_ms * 1000:.1f} µs per signature "
        f"(best of {args.rounds} x {args.iterations:,}; fresh nonce each)"
    )
    print(f"target <= {TARGET_MS} ms per signature: {verdict}")


if __name__ == "__main__":
    main()
