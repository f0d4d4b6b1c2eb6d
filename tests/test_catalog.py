"""The model catalog and its /models rendering."""

from __future__ import annotations

from bot.catalog import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_GENERATE_MODEL,
    MODELS,
    choices,
    default_model,
    find_model,
    get_model,
    sizes_of,
)
from bot.replies import help_text, models_text

SEED_MODELS = {
    "google/nano-banana": 52_500,
    "google/nano-banana-pro": 105_000,
    "openai/gpt-image-1": 21_000,
    "openai/gpt-image-2": 63_000,
    "openai/dall-e-3": 42_000,
    "openai/dall-e-2": 21_000,
    "black-forest/flux-1.1-pro": 42_000,
    "zai/cogview-4": 15_000,
    "xai/grok-imagine-image": 21_000,
    "xai/grok-imagine-image-pro": 74_000,
}


def test_every_model_the_seed_documents_name_is_present_at_its_square_price() -> None:
    assert {model.id: model.prices["1024x1024"] for model in MODELS} == SEED_MODELS


def test_names_are_unique_across_the_catalog() -> None:
    names = [name.lower() for model in MODELS for name in (model.id, *model.shorthands)]
    assert len(names) == len(set(names))


def test_prices_are_positive_integers_of_micro_usdc() -> None:
    for model in MODELS:
        for table in (model.prices, model.hd_prices):
            assert all(type(micro) is int and micro > 0 for micro in table.values())
        assert set(model.hd_prices) <= set(model.prices)


def test_published_prices_for_larger_sizes() -> None:
    assert get_model("google/nano-banana-pro").price_micro("4096x4096") == 157_500
    assert get_model("openai/gpt-image-2").price_micro("1536x1024") == 126_000
    assert get_model("zai/cogview-4").price_micro("1440x1440") == 20_000
    assert get_model("openai/dall-e-3").price_micro("1792x1024", "hd") == 126_000


def test_edit_and_mask_rules_follow_blockrun() -> None:
    editors = {model.id: (model.max_inputs, model.mask) for model in MODELS if model.edits}
    assert editors == {
        "google/nano-banana": (3, False),
        "google/nano-banana-pro": (3, False),
        "openai/gpt-image-1": (4, True),
        "openai/gpt-image-2": (4, True),
    }


def test_defaults_exist_and_offer_the_default_size() -> None:
    assert "1024x1024" in get_model(DEFAULT_GENERATE_MODEL).sizes
    assert get_model(DEFAULT_EDIT_MODEL).edits
    assert find_model("gpt-image") is get_model("openai/gpt-image-1")


def test_models_text_lists_every_model_with_id_prices_and_sizes() -> None:
    text = models_text()
    for model in MODELS:
        line = next(line for line in text.splitlines() if f" {model.name}: {model.id}," in line)
        assert all(size in line for size in model.sizes)
    assert "$0.0525" in text and "mask" in text and "edits up to 3 images" in text


def test_help_shows_every_command() -> None:
    text = help_text()
    for command in ("/imagegen", "/img2img", "/models", "/spend", "--model", "--mask"):
        assert command in text


def test_choices_are_the_models_each_command_can_use() -> None:
    editing = {model.name for model in choices(editing=True)}
    drawing = {model.name for model in choices(editing=False)}
    assert editing == {"nano-banana", "banana-pro", "gpt-image", "gpt-image-2"}
    assert "flux" in drawing and "gpt-image" in drawing and "flux" not in editing


def test_sizes_of_a_named_model_else_of_the_commands_default() -> None:
    assert sizes_of("dall-e-3", editing=False) == ("1024x1024", "1792x1024", "1024x1792")
    assert sizes_of(None, editing=True) == default_model(editing=True).sizes
    assert sizes_of("no-such-model", editing=False) == default_model(editing=False).sizes
