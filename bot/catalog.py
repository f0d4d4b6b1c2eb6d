"""The model catalog: one table, easy to edit when BlockRun adds or delists a model.

Prices are BlockRun's published per-image prices in micro-USDC, 5% margin included
(seed docs 002 and 003). They are estimates for budgets and status messages: the
gateway's 402 quote is the final word and is checked against the bot's own cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

STANDARD = "standard"
HD = "hd"


@dataclass(frozen=True)
class Model:
    """One image model as the bot offers it."""

    id: str
    shorthands: tuple[str, ...]
    provider: str
    prices: Mapping[str, int]  # size -> micro-USDC per image at standard quality
    generates: bool = True
    edits: bool = False
    mask: bool = False
    max_inputs: int = 0
    max_n: int = 4
    hd_prices: Mapping[str, int] = field(default_factory=dict)  # size -> micro-USDC at hd

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.prices)

    @property
    def qualities(self) -> tuple[str, ...]:
        return (STANDARD, HD) if self.hd_prices else ()

    @property
    def name(self) -> str:
        """The shorthand users type."""
        return self.shorthands[0]

    @property
    def cheapest_micro(self) -> int:
        return min(self.prices.values())

    def price_micro(self, size: str, quality: str | None = None) -> int:
        """Catalog price of one image of ``size`` (which must be one of ``sizes``)."""
        table = self.hd_prices if quality == HD else self.prices
        return table[size]


SQUARE = "1024x1024"

MODELS: tuple[Model, ...] = (
    Model(
        id="google/nano-banana",
        shorthands=("nano-banana", "banana"),
        provider="Google",
        prices={SQUARE: 52_500, "1216x832": 52_500, "832x1216": 52_500, "1024x1792": 52_500},
        edits=True,
        max_inputs=3,
    ),
    Model(
        id="google/nano-banana-pro",
        shorthands=("banana-pro", "nano-banana-pro"),
        provider="Google",
        prices={SQUARE: 105_000, "2048x2048": 105_000, "4096x4096": 157_500},
        edits=True,
        max_inputs=3,
    ),
    Model(
        id="openai/gpt-image-1",
        shorthands=("gpt-image", "gpt-image-1"),
        provider="OpenAI",
        prices={SQUARE: 21_000, "1536x1024": 42_000, "1024x1536": 42_000},
        edits=True,
        mask=True,
        max_inputs=4,
    ),
    Model(
        id="openai/gpt-image-2",
        shorthands=("gpt-image-2",),
        provider="OpenAI",
        prices={SQUARE: 63_000, "1536x1024": 126_000, "1024x1536": 126_000},
        edits=True,
        mask=True,
        max_inputs=4,
    ),
    Model(
        id="openai/dall-e-3",
        shorthands=("dall-e-3", "dalle3"),
        provider="OpenAI",
        prices={SQUARE: 42_000, "1792x1024": 84_000, "1024x1792": 84_000},
        hd_prices={SQUARE: 84_000, "1792x1024": 126_000, "1024x1792": 126_000},
        max_n=1,  # OpenAI's DALL-E 3 draws one image per request
    ),
    Model(
        id="openai/dall-e-2",
        shorthands=("dall-e-2", "dalle2"),
        provider="OpenAI",
        prices={"256x256": 16_800, "512x512": 18_900, SQUARE: 21_000},
    ),
    Model(
        id="black-forest/flux-1.1-pro",
        shorthands=("flux", "flux-1.1-pro"),
        provider="Black Forest Labs",
        prices={SQUARE: 42_000, "1216x832": 42_000, "832x1216": 42_000},
    ),
    Model(
        id="zai/cogview-4",
        shorthands=("cogview", "cogview-4"),
        provider="Zhipu AI",
        prices={
            SQUARE: 15_000,
            "768x1344": 15_000,
            "1344x768": 15_000,
            "864x1152": 15_000,
            "1152x864": 15_000,
            "720x1440": 15_000,
            "1440x720": 15_000,
            "1440x1440": 20_000,
        },
    ),
    Model(
        id="xai/grok-imagine-image",
        shorthands=("grok-imagine", "grok"),
        provider="xAI",
        prices={SQUARE: 21_000},
    ),
    Model(
        id="xai/grok-imagine-image-pro",
        shorthands=("grok-imagine-pro", "grok-pro"),
        provider="xAI",
        prices={SQUARE: 74_000},
    ),
)

DEFAULT_GENERATE_MODEL = "google/nano-banana"
DEFAULT_EDIT_MODEL = "openai/gpt-image-1"
DEFAULT_SIZE = SQUARE

_BY_NAME: dict[str, Model] = {
    name.lower(): model for model in MODELS for name in (model.id, *model.shorthands)
}


def find_model(name: str) -> Model | None:
    """Look a model up by full id or shorthand, case-insensitively."""
    return _BY_NAME.get(name.strip().lower())


def get_model(model_id: str) -> Model:
    """The model with this exact full id; a KeyError means the catalog is wrong."""
    model = find_model(model_id)
    if model is None or model.id != model_id:
        raise KeyError(model_id)
    return model


def default_model(*, editing: bool) -> Model:
    """The model ``/img2img`` (``editing``) or ``/imagegen`` uses when none is named."""
    return get_model(DEFAULT_EDIT_MODEL if editing else DEFAULT_GENERATE_MODEL)


def choices(*, editing: bool) -> tuple[Model, ...]:
    """The models ``/img2img`` (``editing``) or ``/imagegen`` can use, in catalog order."""
    return tuple(model for model in MODELS if (model.edits if editing else model.generates))


def sizes_of(name: str | None, *, editing: bool) -> tuple[str, ...]:
    """The sizes of the named model, or of the default one when the name is unknown or unset."""
    model = find_model(name) if name else None
    return (model or default_model(editing=editing)).sizes
