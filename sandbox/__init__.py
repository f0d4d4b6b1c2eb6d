"""The sandbox gateway: BlockRun's image API on loopback, for trying the bot without money.

Like a payment provider's test mode, it quotes in x402 (Base Sepolia USDC by default), checks
real EIP-3009 signatures, refuses replays and "settles" only in memory (``Sandbox.settlements``,
``GET /sandbox/settlements``). Pictures are placeholders drawn locally. Fast models answer 200;
slow models answer 202 and settle on the first poll that sees the job completed. The words that
make it misbehave on purpose (``#policy``, ``#slow``, ``#huge``...) are listed in README.md,
"The sandbox gateway".

It sits above the core (it imports ``bot``; ``bot`` never imports it) and shares the bot's event
loop in ``imagebot demo``, so its CPU work runs in threads.
"""

from sandbox.gateway import DEFAULT_SLOW_MODELS, Sandbox, serve_forever
from sandbox.payments import SANDBOX_PAY_TO, Settlement

__all__ = ["DEFAULT_SLOW_MODELS", "SANDBOX_PAY_TO", "Sandbox", "Settlement", "serve_forever"]
