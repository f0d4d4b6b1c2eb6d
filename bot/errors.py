"""One exception hierarchy for the core; each error carries the sentence the user sees.

``charged`` says whether money may have left the wallet: ``False`` (nothing was charged),
``True`` (it was), or ``None`` (the outcome could not be learned).
"""

from __future__ import annotations


class ImagebotError(Exception):
    """Base of every error the core reports to a chat user."""

    charged: bool | None = False

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


class UsageError(ImagebotError):
    """The command cannot be run as written; the message says what to change."""


class ConfigError(ImagebotError):
    """A setting is invalid; the message names the variable, never its value."""


class PaymentRefused(ImagebotError):
    """The bot declined to sign: over its cap, over a budget, or a quote it cannot trust."""


class GatewayError(ImagebotError):
    """The image gateway failed or answered something the bot cannot use."""


class InputUnavailable(ImagebotError):
    """A picture the user gave could not be had (too big for the platform, or not downloaded)."""
