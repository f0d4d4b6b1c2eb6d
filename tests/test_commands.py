"""The command parser: every flag, every default, every rejection, and any text at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.console import take_image_paths
from bot.catalog import MODELS, find_model
from bot.commands import (
    ADMIN_MENU,
    MENU,
    BudgetChange,
    CancelJobs,
    Command,
    Help,
    LinkAccounts,
    Models,
    PauseSpending,
    SpendQuery,
    Unlink,
    WalletQuery,
)
from bot.commands import parse as parse_command
from bot.errors import UsageError
from bot.requests import (
    MAX_INPUT_BYTES,
    MAX_PROMPT_CHARS,
    EditRequest,
    GenerateRequest,
    ImageCommand,
    ImageInput,
    build_request,
    detect_mime,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 32
GIF = b"GIF89a" + b"\x00" * 32


def parse(
    text: str, attachments: tuple[bytes, ...] = (), *, bot_username: str | None = None
) -> Command | GenerateRequest | EditRequest | None:
    """The message path: the text parser, then ``build_request`` with the attached pictures."""
    command = parse_command(text, bot_username=bot_username)
    if isinstance(command, ImageCommand):
        return command.build(tuple(ImageInput(data) for data in attachments))
    return command


def generate(text: str, **kwargs: object) -> GenerateRequest:
    request = parse(text, **kwargs)  # type: ignore[arg-type]
    assert isinstance(request, GenerateRequest)
    return request


def edit(text: str, *attachments: bytes) -> EditRequest:
    request = parse(text, attachments)
    assert isinstance(request, EditRequest)
    return request


def rejection(text: str, *attachments: bytes) -> str:
    with pytest.raises(UsageError) as caught:
        parse(text, attachments)
    return caught.value.user_message


# --- defaults ---------------------------------------------------------------------------


def test_imagegen_defaults_to_nano_banana_square_one_image() -> None:
    request = generate("/imagegen a fox in the snow")
    assert request.prompt == "a fox in the snow"
    assert request.model.id == "google/nano-banana"
    assert (request.size, request.n, request.quality) == ("1024x1024", 1, None)
    assert request.estimate_micro == 52_500


def test_img2img_defaults_to_gpt_image_1_square_one_image() -> None:
    request = edit("/img2img make it winter", PNG)
    assert request.model.id == "openai/gpt-image-1"
    assert (request.size, request.n, request.mask) == ("1024x1024", 1, None)
    assert request.images[0].mime == "image/png"


def test_dalle3_quality_defaults_to_standard() -> None:
    assert generate("/imagegen -m dall-e-3 a city").quality == "standard"


# --- flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "/imagegen --model flux a fox",
        "/imagegen --model=flux a fox",
        "/imagegen -m flux a fox",
        "/imagegen -m=flux a fox",
        "/imagegen a fox --model flux",
        "/imagegen --model black-forest/flux-1.1-pro a fox",
        "/imagegen --model FLUX a fox",
        '/imagegen --model="flux" a fox',
    ],
)
def test_model_flag_forms_all_select_the_model(text: str) -> None:
    request = generate(text)
    assert request.model.id == "black-forest/flux-1.1-pro"
    assert request.prompt == "a fox"


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.id)
def test_every_shorthand_and_full_id_resolves(model: object) -> None:
    for name in (model.id, *model.shorthands):  # type: ignore[attr-defined]
        assert generate(f"/imagegen -m {name} x").model == model


@pytest.mark.parametrize(
    ("flag", "size"),
    [
        ("--size 1216x832", "1216x832"),
        ("--size=1216x832", "1216x832"),
        ("-s 1216x832", "1216x832"),
        ("-s 1216X832", "1216x832"),
        ("-s 1216\u00d7832", "1216x832"),
    ],
)
def test_size_flag_forms(flag: str, size: str) -> None:
    assert generate(f"/imagegen {flag} a fox").size == size


@pytest.mark.parametrize("flag", ["--n 3", "--n=3", "-n 3"])
def test_n_flag_forms(flag: str) -> None:
    request = generate(f"/imagegen {flag} a fox")
    assert request.n == 3
    assert request.estimate_micro == 3 * 52_500


@pytest.mark.parametrize("n", ["1", "4"])
def test_n_accepts_one_to_four(n: str) -> None:
    assert generate(f"/imagegen --n {n} a fox").n == int(n)


def test_quality_hd_prices_from_the_hd_table() -> None:
    request = generate("/imagegen -m dall-e-3 --quality hd -s 1792x1024 a city")
    assert request.quality == "hd"
    assert request.estimate_micro == 126_000
    assert generate("/imagegen -m dall-e-3 -q HD a city").quality == "hd"
    assert generate("/imagegen -m dall-e-3 --quality=standard a city").estimate_micro == 42_000


def test_mask_takes_the_last_image_as_mask() -> None:
    source, mask = PNG + b"source", PNG + b"mask"
    request = edit("/img2img --mask replace the sky", source, mask)
    assert request.images[0].data == source
    assert request.mask is not None and request.mask.data == mask


def test_double_dash_ends_flags() -> None:
    assert generate("/imagegen -- --model is part of the prompt").prompt == (
        "--model is part of the prompt"
    )
    assert generate("/imagegen -m flux -- -s x").prompt == "-s x"


def test_quoted_prompt_is_one_string_and_keeps_its_spacing() -> None:
    assert generate('/imagegen -m flux "a fox  --n 3"').prompt == "a fox  --n 3"
    assert generate("/imagegen '-m is text'").prompt == "-m is text"
    assert generate("/imagegen \u201csmart quotes\u201d").prompt == "smart quotes"


def test_quotes_inside_a_prompt_are_kept() -> None:
    prompt = generate('/imagegen a sign that says "open late"').prompt
    assert prompt == 'a sign that says "open late"'


def test_apostrophes_and_unmatched_quotes_are_prose() -> None:
    assert generate("/imagegen a fox's den").prompt == "a fox's den"
    assert generate('/imagegen 12" vinyl').prompt == '12" vinyl'
    assert generate("/imagegen 'tis the season").prompt == "'tis the season"


def test_dashes_that_are_not_flags_stay_in_the_prompt() -> None:
    assert generate("/imagegen it is -5 degrees - brr").prompt == "it is -5 degrees - brr"


def test_prompt_may_start_on_the_next_line() -> None:
    assert generate("/imagegen\na fox\nin snow").prompt == "a fox\nin snow"


def test_flags_may_come_after_the_prompt() -> None:
    request = generate("/imagegen a lighthouse --size 832x1216 -m flux --n 2")
    assert (request.prompt, request.size, request.n) == ("a lighthouse", "832x1216", 2)


# --- command names and addressing -------------------------------------------------------


def test_command_addressed_to_this_bot_is_parsed() -> None:
    assert generate("/imagegen@ImageBot a fox", bot_username="imagebot").prompt == "a fox"


def test_command_addressed_to_another_bot_is_not_ours() -> None:
    assert parse("/imagegen@OtherBot a fox", bot_username="ImageBot") is None


def test_command_names_are_case_insensitive() -> None:
    assert generate("/ImageGen a fox").prompt == "a fox"


@pytest.mark.parametrize("text", ["", "   ", "hello", "a fox /imagegen", "/unknown x", "/", "/-x"])
def test_non_commands_are_not_ours(text: str) -> None:
    assert parse(text) is None


@pytest.mark.parametrize("text", ["/help", "/start", "/help@ImageBot", "/start me"])
def test_help_and_start(text: str) -> None:
    assert parse(text) == Help()


def test_models() -> None:
    assert parse("/models") == Models()


@pytest.mark.parametrize("text", ["/cancel", "/Cancel", "/cancel@ImageBot", "/cancel now"])
def test_cancel(text: str) -> None:
    assert parse(text, bot_username="ImageBot") == CancelJobs()


@pytest.mark.parametrize(
    ("text", "who"),
    [
        ("/spend", None),
        ("/spend all", "all"),
        ("/spend ALL", "all"),
        ("/spend telegram:12345", "telegram:12345"),
        ("/spend Discord:678", "discord:678"),
        ("/spend @alice", "@alice"),
    ],
)
def test_spend_queries(text: str, who: str | None) -> None:
    assert parse(text) == SpendQuery(who)


@pytest.mark.parametrize("text", ["/spend bob", "/spend slack:1", "/spend a b", "/spend telegram:"])
def test_spend_with_an_unknown_user_form_is_refused(text: str) -> None:
    assert "platform:id" in rejection(text)


# --- rejections -------------------------------------------------------------------------


def test_unknown_model_is_refused_with_a_pointer_to_models() -> None:
    message = rejection("/imagegen -m midjourney a fox")
    assert "midjourney" in message and "/models" in message


def test_size_not_offered_by_the_model_lists_the_sizes() -> None:
    message = rejection("/imagegen -m flux -s 2048x2048 a fox")
    assert "2048x2048" in message and "1216x832" in message


@pytest.mark.parametrize("size", ["big", "1024", "1024x", "x1024", "10x10x10"])
def test_malformed_size_is_refused(size: str) -> None:
    assert "1024x1024" in rejection(f"/imagegen -s {size} a fox")


@pytest.mark.parametrize("n", ["0", "5", "-1", "two", "1.5", "99999999999"])
def test_n_outside_one_to_four_is_refused(n: str) -> None:
    assert "1 to 4" in rejection(f"/imagegen --n={n} a fox")


def test_n_above_the_models_own_limit_is_refused() -> None:
    assert "dall-e-3" in rejection("/imagegen -m dall-e-3 --n 2 a fox")


def test_quality_on_a_model_without_it_is_refused() -> None:
    assert "dall-e-3" in rejection("/imagegen --quality hd a fox")


def test_unknown_quality_value_is_refused() -> None:
    assert "standard" in rejection("/imagegen -m dall-e-3 --quality ultra a fox")


@pytest.mark.parametrize("flag", ["--model", "-m", "--size", "-s", "--n", "--quality", "--model="])
def test_flag_without_value_is_refused(flag: str) -> None:
    assert "needs a value" in rejection(f"/imagegen {flag}")


@pytest.mark.parametrize("flag", ["--colour red", "--seed=3", "-x"])
def test_unknown_flag_is_refused(flag: str) -> None:
    assert "Unknown flag" in rejection(f"/imagegen {flag} a fox")


@pytest.mark.parametrize("text", ["/imagegen", "/imagegen   ", "/imagegen -m flux", '/imagegen ""'])
def test_empty_prompt_is_refused_with_an_example(text: str) -> None:
    assert "/imagegen a fox" in rejection(text)


def test_empty_edit_prompt_is_refused() -> None:
    assert "/img2img" in rejection("/img2img", PNG)


def test_overlong_prompt_is_refused() -> None:
    assert "4,000" in rejection("/imagegen " + "a" * (MAX_PROMPT_CHARS + 1))
    assert generate("/imagegen " + "a" * MAX_PROMPT_CHARS)


def test_mask_on_imagegen_is_refused() -> None:
    assert "/img2img" in rejection("/imagegen --mask a fox")


def test_img2img_without_an_image_is_refused() -> None:
    assert "Attach" in rejection("/img2img make it winter")


def test_img2img_with_a_model_that_cannot_edit_is_refused() -> None:
    message = rejection("/img2img -m flux make it winter", PNG)
    assert "can't edit" in message and "gpt-image" in message


def test_mask_with_a_google_model_is_refused() -> None:
    message = rejection("/img2img -m nano-banana --mask fix", PNG, PNG)
    assert "mask" in message and "gpt-image" in message


@pytest.mark.parametrize("count", [1, 3])
def test_mask_needs_exactly_one_source_and_one_mask(count: int) -> None:
    assert "exactly two" in rejection("/img2img --mask fix", *([PNG] * count))


def test_openai_takes_four_images_google_three() -> None:
    assert len(edit("/img2img fuse", *[PNG] * 4).images) == 4
    assert len(edit("/img2img -m nano-banana fuse", *[PNG] * 3).images) == 3
    assert "at most 4" in rejection("/img2img fuse", *[PNG] * 5)
    assert "at most 3" in rejection("/img2img -m banana-pro fuse", *[PNG] * 4)


@pytest.mark.parametrize(
    ("data", "mime"), [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp")]
)
def test_png_jpeg_webp_are_detected_from_bytes(data: bytes, mime: str) -> None:
    assert detect_mime(data) == mime
    assert edit("/img2img x", data).images[0].mime == mime


@pytest.mark.parametrize("data", [GIF, b"", b"%PDF-1.7", b"RIFF\x00\x00\x00\x00WAVE", b"<svg/>"])
def test_other_files_are_refused_naming_the_image(data: bytes) -> None:
    assert "Image 2 is not a PNG, JPEG or WebP" in rejection("/img2img x", PNG, data)


def test_oversized_input_is_refused() -> None:
    huge = PNG + b"\x00" * MAX_INPUT_BYTES
    assert "limit is 20 MB" in rejection("/img2img x", huge)


def test_image_flag_in_chat_is_refused() -> None:
    assert "Attach" in rejection("/img2img --image /etc/passwd x", PNG)


def test_imagegen_ignores_attachments() -> None:
    assert generate("/imagegen a fox", attachments=(GIF,)).prompt == "a fox"


# --- typed values, as slash commands give them ---------------------------------------


def test_build_request_takes_typed_values_and_keeps_picture_references() -> None:
    source, mask = ImageInput(PNG, "123/456/1"), ImageInput(PNG, "123/456/2")
    request = build_request(
        "img2img",
        " add snow ",
        model="gpt-image-2",
        size="1536x1024",
        images=(source, mask),
        mask=True,
    )
    assert isinstance(request, EditRequest)
    assert (request.prompt, request.model.id, request.size, request.n) == (
        "add snow",
        "openai/gpt-image-2",
        "1536x1024",
        1,
    )
    assert (request.images, request.mask) == ((source,), mask)
    assert request.mask is not None and request.mask.ref == "123/456/2"


def test_build_request_treats_blank_options_as_unset_and_checks_an_int_n() -> None:
    request = build_request("imagegen", "a fox", model="", size=" ", n=2)
    assert (request.model.id, request.size, request.n) == ("google/nano-banana", "1024x1024", 2)
    with pytest.raises(UsageError, match="1 to 4"):
        build_request("imagegen", "a fox", n=5)


def test_check_refuses_bad_options_before_any_picture_is_fetched() -> None:
    with pytest.raises(UsageError, match="can't edit"):
        ImageCommand("img2img", "x", model="flux").check()
    ImageCommand("img2img", "x").check()  # no pictures needed to pass


def test_the_menu_lists_every_command_once() -> None:
    names = [entry.name for entry in MENU]
    assert names == [
        "imagegen", "img2img", "cancel", "models", "spend", "link", "unlink", "help"
    ]  # fmt: skip
    assert [entry.name for entry in ADMIN_MENU] == ["wallet", "budget", "pause", "resume"]


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/budget telegram:12 2.50", BudgetChange("telegram:12", 2_500_000)),
        ("/budget @bob $0.5", BudgetChange("@bob", 500_000)),
        ("/budget @bob", BudgetChange("@bob")),
        ("/budget discord:7 RESET", BudgetChange("discord:7", reset=True)),
        ("/budget default 3", BudgetChange(None, 3_000_000)),
        ("/budget default", BudgetChange(None)),
        ("/pause", PauseSpending(True)),
        ("/resume", PauseSpending(False)),
        ("/wallet", WalletQuery()),
        ("/link", LinkAccounts(None)),
        ("/link  abcd-2345 ", LinkAccounts("abcd-2345")),
        ("/unlink", Unlink()),
        ("/spend all models", SpendQuery("all", by_model=True)),
        ("/spend ALL users", SpendQuery("all")),
    ],
)
def test_admin_and_link_commands_parse(text: str, command: Command) -> None:
    assert parse_command(text) == command


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/budget", "Use /budget USER AMOUNT"),
        ("/budget all 1", "Use /budget USER AMOUNT"),
        ("/budget telegram:1 2 3", "Use /budget USER AMOUNT"),
        ("/budget default reset", "The default can't be reset"),
        ("/budget telegram:1 -1", "is not an amount in USD"),
        ("/budget telegram:1 0.0000001", "is not an amount in USD"),
        ("/budget nobody 1", "I don't know the user"),
    ],
)
def test_bad_budget_commands_say_what_to_change(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_command(text)


# --- console-only image paths -----------------------------------------------------------


def test_take_image_paths_removes_only_the_image_flags() -> None:
    text, paths = take_image_paths('/img2img --image ~/a.png --image="/tmp/x y.png" say "hi"')
    assert paths == ["~/a.png", "/tmp/x y.png"]
    assert edit(text, PNG).prompt == 'say "hi"'


def test_take_image_paths_stops_at_double_dash() -> None:
    assert take_image_paths("/img2img -- --image x")[1] == []


def test_take_image_paths_without_a_path_is_refused() -> None:
    with pytest.raises(UsageError):
        take_image_paths("/img2img x --image")


def test_price_line_names_model_size_and_price() -> None:
    request = generate("/imagegen --n 2 x")
    assert request.price_line(request.estimate_micro) == "nano-banana · 1024x1024 · $0.105"


# --- any text at all --------------------------------------------------------------------

_COMMAND_WORDS = st.sampled_from(
    ["/imagegen", "/img2img", "/spend", "/models", "/help", "/imagegen@Bot", "/x", ""]
)
_FLAG_WORDS = st.sampled_from(
    [
        "--model",
        "-m",
        "--size",
        "-s",
        "--n",
        "-n",
        "--quality",
        "--mask",
        "--",
        "--image",
        "=",
        '"',
        "'",
        "\u201c",
        "\u201d",
        "flux",
        "dall-e-3",
        "1024x1024",
        "hd",
        "4",
        "all",
        "@a",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(_COMMAND_WORDS, _FLAG_WORDS, st.text(max_size=12)), max_size=12),
    st.lists(st.sampled_from([PNG, JPEG, WEBP, GIF, b""]), max_size=6),
)
def test_any_text_parses_to_a_request_or_a_usage_error(
    words: list[str], files: list[bytes]
) -> None:
    text = " ".join(words)
    try:
        result = parse(text, tuple(files), bot_username="Bot")
    except UsageError as error:
        assert error.user_message.strip()
        return
    assert result is None or isinstance(
        result, GenerateRequest | EditRequest | SpendQuery | Help | Models
    )
    if isinstance(result, GenerateRequest | EditRequest):
        assert result.prompt and result.size in result.model.sizes and 1 <= result.n <= 4
        assert isinstance(result.estimate_micro, int)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_unicode_never_raises_anything_else(text: str) -> None:
    for candidate in (text, "/imagegen " + text, "/img2img " + text, "/spend " + text):
        try:
            parse(candidate, (PNG,))
            take_image_paths(candidate)
        except UsageError:
            pass


def test_find_model_ignores_case_and_space() -> None:
    assert find_model("  Banana-Pro ") is not None
