"""The sandbox gateway: BlockRun's image API on loopback, for trying the bot without money.

Like a payment provider's test mode, it quotes in x402 (Base Sepolia USDC by default), checks
real EIP-3009 signatures, refuses replays and "settles" only in memory (``Sandbox.settlements``,
``GET /sandbox/settlements``). Pictures are placeholders drawn locally. Fast models answer 200;
slow models answer 202 and settle on the first poll that sees the job completed.

A tag in the prompt makes it misbehave on purpose:

================  ============================================================================
tag               answer
================  ============================================================================
``#policy``       403 ``content_policy_violation``, before any quote
``#ratelimit``    429 with ``Retry-After: 7``, before any quote
``#servererror``  500 after a valid payment; nothing settled
``#timeout``      504 after a valid payment; nothing settled
``#nofunds``      the paid request is refused 402 ``insufficient_funds``; nothing settled
``#slow``         202 and polling (as for slow models); settles on completion
``#fail``         202; the job ends ``failed`` and is never charged
``#never``        202; the job stays ``in_progress`` forever and is never charged
``#big``          the picture is ~1.5 MB of noise (1024x1024) for oversize and load tests
``#wide``         the picture is 4200x200 whatever the size: wider than Telegram's 20:1 photos
``#huge``         the picture is 2048x2048 of full noise whatever the size: a ~12 MB PNG, over
                  Discord's 10 MiB upload limit
================  ============================================================================

An authorization's (from, nonce) pair is accepted once, even when the request then fails:
every request, retries included, needs a freshly signed payment.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import textwrap
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from io import BytesIO
from typing import Any, TypeVar

from aiohttp import web
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils import keccak, to_checksum_address
from PIL import Image, ImageDraw, ImageFont, ImageOps

from bot.catalog import DEFAULT_EDIT_MODEL, DEFAULT_SIZE, Model, find_model
from bot.chains import BASE_SEPOLIA, Chain
from bot.money import usd_string

# keccak("imagebot sandbox")[-20:]: an address nobody holds a key for.
SANDBOX_PAY_TO = "0x1f9994449098867e0A14f77DcAD0fD3beBe3ae15"
DEFAULT_SLOW_MODELS = frozenset({"openai/gpt-image-2", "google/nano-banana-pro"})
MAX_TIMEOUT_SECONDS = 300

_MAX_ENTRIES = 1000  # jobs and stored images
_MAX_IMAGE_BYTES = 256 * 2**20
_RENDER_CACHE_SIZE = 32
_MAX_BODY_BYTES = 64 * 2**20
_TAG = re.compile(r"#(\w+)")
_FORCED_SLOW = frozenset({"slow", "fail", "never"})
_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_HEX_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_DIGITS = re.compile(r"[0-9]{1,78}")
_AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}

_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Settlement:
    """One charge the sandbox settled."""

    tx_hash: str
    payer: str
    amount_micro: int
    nonce: str
    model: str
    settled_at: float


class _BadRequest(Exception):
    """A request the real gateway would answer 400; ``code`` goes in the error body."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _Refused(Exception):
    """A payment the sandbox will not accept; the message is the x402 error reason."""


@dataclass(frozen=True)
class _Order:
    """A validated image request."""

    model: Model
    prompt: str
    size: str
    n: int
    quality: str | None
    source: bytes | None  # the first input image of an edit
    source_digest: str
    tags: frozenset[str]

    @property
    def price_micro(self) -> int:
        return self.model.price_micro(self.size, self.quality) * self.n


@dataclass(frozen=True)
class _Payment:
    """A decoded x402 payment: one EIP-3009 authorization and its signature."""

    payer: str
    pay_to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str


@dataclass
class _Job:
    """An order answered 202: drawn and settled on the first poll that sees it completed."""

    id: str
    order: _Order
    payment: _Payment
    resource_url: str
    submitted_at: float  # time.monotonic()
    data: list[dict[str, str]] | None = None
    settlement: Settlement | None = None


class Sandbox:
    """An x402 image gateway on loopback that checks real signatures and charges nothing real."""

    def __init__(
        self,
        *,
        pay_to: str = SANDBOX_PAY_TO,
        chain: Chain = BASE_SEPOLIA,
        x402_version: int = 2,
        latency: float = 0.0,
        job_seconds: float = 3.0,
        slow_models: frozenset[str] = DEFAULT_SLOW_MODELS,
    ) -> None:
        if x402_version not in (1, 2):
            raise ValueError("x402_version must be 1 or 2")
        self.pay_to = pay_to
        self.chain = chain
        self.x402_version = x402_version
        self.latency = latency
        self.job_seconds = job_seconds
        self.slow_models = slow_models
        self.settlements: list[Settlement] = []
        self._used_nonces: set[tuple[str, str]] = set()
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._image_bytes = 0
        self._rendered: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.url = ""  # the API root, once started
        self.app = web.Application(client_max_size=_MAX_BODY_BYTES)
        self.app.add_routes(
            [
                web.post("/v1/images/generations", self._generate),
                web.post("/v1/images/image2image", self._edit),
                web.get("/v1/images/generations/{job_id}", self._poll),
                web.get("/images/{image_id}.png", self._image),
                web.get("/sandbox/settlements", self._settlements),
            ]
        )

    @property
    def payments_received(self) -> int:
        """Signed payments accepted so far, settled or not (a paid request may still be running)."""
        return len(self._used_nonces)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the API root URL."""
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def _network(self) -> str:
        return self.chain.caip2 if self.x402_version == 2 else self.chain.v1_name

    async def _generate(self, request: web.Request) -> web.Response:
        return await self._order(request, edit=False)

    async def _edit(self, request: web.Request) -> web.Response:
        return await self._order(request, edit=True)

    async def _order(self, request: web.Request, *, edit: bool) -> web.Response:
        try:
            order = _parse_order(await request.read(), edit=edit)
        except _BadRequest as exc:
            return _error(400, str(exc), exc.code)
        if "policy" in order.tags:
            return _error(403, "Content policy violation detected", "content_policy_violation")
        if "ratelimit" in order.tags:
            return _error(
                429,
                "Rate limit exceeded; retry in 7 seconds",
                "rate_limit_exceeded",
                headers={"Retry-After": "7"},
            )
        resource_url = str(request.url)
        header = self._payment_header(request)
        if header is None:
            return self._payment_required(resource_url, order, "Payment required")
        try:
            payment = _parse_payment(header, version=self.x402_version, chain=self.chain)
            self._verify(payment, order.price_micro)
            if "nofunds" in order.tags:
                raise _Refused("insufficient_funds")
        except _Refused as exc:
            return self._payment_required(resource_url, order, str(exc))
        self._used_nonces.add((payment.payer.lower(), payment.nonce.lower()))
        await asyncio.sleep(self.latency)
        if "servererror" in order.tags:
            return _error(500, "The image provider failed", "server_error", kind="server_error")
        if "timeout" in order.tags:
            return _error(504, "Image generation timed out", "timeout", kind="server_error")
        if order.model.id in self.slow_models or order.tags & _FORCED_SLOW:
            return self._submit(request, order, payment, resource_url)
        data = await self._deliver(request, order)
        settlement = self._settle(order, payment)
        return web.json_response(
            self._result(order, data, settlement, "settled"),
            headers=self._receipt(settlement),
        )

    def _submit(
        self, request: web.Request, order: _Order, payment: _Payment, resource_url: str
    ) -> web.Response:
        job = _Job(uuid.uuid4().hex, order, payment, resource_url, time.monotonic())
        _remember(self._jobs, job.id, job, _MAX_ENTRIES)
        body = {
            "id": job.id,
            "status": "queued",
            "poll_url": f"{request.url.origin()}/v1/images/generations/{job.id}",
            "price": _price(order.price_micro),
            "payment_status": "verified",
        }
        return web.json_response(body, status=202)

    async def _poll(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        job = self._jobs.get(job_id)
        if job is None:
            return _error(404, f"No job {job_id}", "job_not_found")
        header = self._payment_header(request)
        if header is None:
            return self._payment_required(job.resource_url, job.order, "Payment required")
        try:
            payment = _parse_payment(header, version=self.x402_version, chain=self.chain)
        except _Refused as exc:
            return self._payment_required(job.resource_url, job.order, str(exc))
        if payment.signature.lower() != job.payment.signature.lower():
            return self._payment_required(job.resource_url, job.order, "payment_mismatch")
        status = self._job_status(job)
        if status == "failed":
            message = "The image provider failed (sandbox #fail); nothing was charged"
            return web.json_response(
                {"id": job.id, "status": status, "error": {"message": message}}
            )
        if status != "completed":
            return web.json_response({"id": job.id, "status": status})
        if job.data is None:
            data = await self._deliver(request, job.order)
            job.data = job.data or data  # a concurrent poll may have drawn them first
        # No await between this check and the settling: concurrent polls settle once.
        if job.settlement is None:
            job.settlement = self._settle(job.order, job.payment)
            payment_status, headers = "settled", self._receipt(job.settlement)
        else:
            payment_status, headers = "already_settled", None
        body = {
            "id": job.id,
            "status": status,
            **self._result(job.order, job.data, job.settlement, payment_status),
        }
        return web.json_response(body, headers=headers)

    def _job_status(self, job: _Job) -> str:
        elapsed = time.monotonic() - job.submitted_at
        if elapsed < self.job_seconds / 4:
            return "queued"
        if elapsed < self.job_seconds or "never" in job.order.tags:
            return "in_progress"
        return "failed" if "fail" in job.order.tags else "completed"

    async def _image(self, request: web.Request) -> web.Response:
        png = self._images.get(request.match_info["image_id"])
        if png is None:
            return _error(404, "No such image (the sandbox keeps only recent ones)", "not_found")
        return web.Response(body=png, content_type="image/png")

    async def _settlements(self, request: web.Request) -> web.Response:
        rows = [asdict(settlement) for settlement in self.settlements]
        total = sum(settlement.amount_micro for settlement in self.settlements)
        return web.json_response({"settlements": rows, "total_micro": total})

    def _payment_header(self, request: web.Request) -> str | None:
        if self.x402_version == 2 and "PAYMENT-SIGNATURE" in request.headers:
            return request.headers["PAYMENT-SIGNATURE"]
        return request.headers.get("X-PAYMENT")

    def _payment_required(self, resource_url: str, order: _Order, error: str) -> web.Response:
        description = f"{order.model.id} image, {order.size}, n={order.n}"
        extra = {"name": self.chain.token_name, "version": self.chain.token_version}
        amount = str(order.price_micro)
        if self.x402_version == 1:
            requirement = {
                "scheme": "exact",
                "network": self.chain.v1_name,
                "maxAmountRequired": amount,
                "resource": resource_url,
                "description": description,
                "mimeType": "application/json",
                "payTo": self.pay_to,
                "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
                "asset": self.chain.usdc,
                "extra": extra,
            }
            body = {"x402Version": 1, "error": error, "accepts": [requirement]}
            return web.json_response(body, status=402)
        body = {
            "x402Version": 2,
            "error": error,
            "resource": {
                "url": resource_url,
                "description": description,
                "mimeType": "application/json",
            },
            "accepts": [
                {
                    "scheme": "exact",
                    "network": self.chain.caip2,
                    "asset": self.chain.usdc,
                    "amount": amount,
                    "payTo": self.pay_to,
                    "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
                    "extra": extra,
                }
            ],
        }
        return web.json_response(body, status=402, headers={"PAYMENT-REQUIRED": _b64json(body)})

    def _verify(self, payment: _Payment, amount_micro: int) -> None:
        """Accept the payment for ``amount_micro`` or raise _Refused naming why not."""
        if _signer(payment, self.chain) != payment.payer.lower():
            raise _Refused("invalid_signature")
        if payment.pay_to.lower() != self.pay_to.lower():
            raise _Refused("recipient_mismatch")
        if payment.value != amount_micro:
            raise _Refused("amount_mismatch")
        now = time.time()
        if now < payment.valid_after:
            raise _Refused("not_yet_valid")
        if now >= payment.valid_before:
            raise _Refused("expired")
        if (payment.payer.lower(), payment.nonce.lower()) in self._used_nonces:
            raise _Refused("nonce_already_used")

    def _settle(self, order: _Order, payment: _Payment) -> Settlement:
        settlement = Settlement(
            tx_hash="0x" + keccak(hexstr=payment.signature).hex(),
            payer=to_checksum_address(payment.payer),
            amount_micro=order.price_micro,
            nonce=payment.nonce,
            model=order.model.id,
            settled_at=time.time(),
        )
        self.settlements.append(settlement)
        return settlement

    def _result(
        self, order: _Order, data: list[dict[str, str]], settlement: Settlement, status: str
    ) -> dict[str, Any]:
        return {
            "created": int(settlement.settled_at),
            "data": data,
            "price": _price(order.price_micro),
            "payment": {"status": status, "tx_hash": settlement.tx_hash, "network": self._network},
        }

    def _receipt(self, settlement: Settlement) -> dict[str, str]:
        name = "PAYMENT-RESPONSE" if self.x402_version == 2 else "X-PAYMENT-RESPONSE"
        receipt = {
            "success": True,
            "transaction": settlement.tx_hash,
            "network": self._network,
            "payer": settlement.payer,
        }
        return {name: _b64json(receipt)}

    async def _deliver(self, request: web.Request, order: _Order) -> list[dict[str, str]]:
        """Draw the order's pictures and hand them out the way BlockRun does for its model."""
        pngs = await asyncio.gather(*(self._render(order, index) for index in range(order.n)))
        data = []
        for png in pngs:
            if order.model.id.startswith("openai/gpt-image"):
                url = "data:image/png;base64," + base64.b64encode(png).decode()
            else:
                url = f"{request.url.origin()}/images/{self._store_image(png)}.png"
            item = {"url": url}
            if order.model.id == "openai/dall-e-3":
                item["revised_prompt"] = f"A sandbox placeholder showing: {order.prompt}"
            data.append(item)
        return data

    async def _render(self, order: _Order, index: int) -> bytes:
        key = (order.model.id, order.size, order.prompt, order.n, index, order.source_digest)
        png = self._rendered.get(key)
        if png is None:
            # Drawing takes milliseconds to a second of CPU: keep it off the event loop.
            png = await asyncio.to_thread(_draw_placeholder, order, index)
        _remember(self._rendered, key, png, _RENDER_CACHE_SIZE)
        return png

    def _store_image(self, png: bytes) -> str:
        image_id = uuid.uuid4().hex
        self._images[image_id] = png
        self._image_bytes += len(png)
        while len(self._images) > _MAX_ENTRIES or self._image_bytes > _MAX_IMAGE_BYTES:
            self._image_bytes -= len(self._images.popitem(last=False)[1])
        return image_id


async def serve_forever(host: str, port: int) -> None:
    """Run a sandbox gateway until cancelled, after printing where it listens."""
    sandbox = Sandbox()
    url = await sandbox.start(host, port)
    print(
        f"sandbox gateway on {url} (Base Sepolia test quotes, nothing real is charged); "
        f"try: IMAGE_API_URL={url} imagebot console",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await sandbox.close()


def _parse_order(raw: bytes, *, edit: bool) -> _Order:
    """Validate a JSON request body as the real gateway does, or raise _BadRequest."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object", "invalid_body")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRequest("prompt is required", "invalid_prompt")
    name = body.get("model", DEFAULT_EDIT_MODEL if edit else None)
    if not isinstance(name, str):
        raise _BadRequest("model is required", "unknown_model")
    model = find_model(name)
    if model is None:
        raise _BadRequest(f"Unknown model: {name}", "unknown_model")
    if not (model.edits if edit else model.generates):
        action = "edit" if edit else "generate"
        raise _BadRequest(f"{model.id} cannot {action} images", "unsupported_model")
    size = body.get("size", DEFAULT_SIZE)
    if size not in model.sizes:
        supported = ", ".join(model.sizes)
        raise _BadRequest(f"Invalid size {size} for {model.id}; use {supported}", "invalid_size")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= model.max_n:
        raise _BadRequest(f"n must be between 1 and {model.max_n} for {model.id}", "invalid_n")
    quality = body.get("quality")
    if quality is not None and quality not in model.qualities:
        raise _BadRequest(f"Invalid quality {quality} for {model.id}", "invalid_quality")
    source = _edit_source(body, model) if edit else None
    return _Order(
        model=model,
        prompt=prompt,
        size=size,
        n=n,
        quality=quality,
        source=source,
        source_digest=hashlib.sha256(source).hexdigest() if source else "",
        tags=frozenset(tag.lower() for tag in _TAG.findall(prompt)),
    )


def _edit_source(body: dict[str, Any], model: Model) -> bytes:
    """Check an edit's images and mask; return the first image's bytes."""
    images = body.get("image")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise _BadRequest("image is required: a data URI or a list of them", "missing_image")
    if len(images) > model.max_inputs:
        message = f"Too many images: {model.id} takes at most {model.max_inputs}"
        raise _BadRequest(message, "too_many_images")
    mask = body.get("mask")
    if mask is not None:
        if not model.mask:
            raise _BadRequest(f"{model.id} does not support masks", "mask_not_supported")
        if len(images) > 1:
            message = "A mask can only be used with a single image"
            raise _BadRequest(message, "mask_with_multiple_images")
        _decode_image(mask)
    decoded = [_decode_image(uri) for uri in images]  # every input must be a picture
    return decoded[0]


def _decode_image(uri: object) -> bytes:
    """The bytes of a PNG, JPEG or WebP data URI, or a _BadRequest."""
    if isinstance(uri, str) and uri.startswith("data:image/"):
        header, _, payload = uri.partition(",")
        if header.endswith(";base64"):
            try:
                raw = base64.b64decode(payload, validate=True)
                with Image.open(BytesIO(raw), formats=("PNG", "JPEG", "WEBP")):
                    return raw
            except (ValueError, OSError, Image.DecompressionBombError):
                pass
    message = "image must be a base64 data URI of a PNG, JPEG or WebP image"
    raise _BadRequest(message, "invalid_image")


def _parse_payment(header: str, *, version: int, chain: Chain) -> _Payment:
    """Decode a payment header (base64 JSON) without judging it, or raise _Refused."""
    try:
        message = json.loads(base64.b64decode(header, validate=True))
        if message["x402Version"] != version:
            raise _Refused("invalid_x402_version")
        scheme_of = message["accepted"] if version == 2 else message
        if scheme_of["scheme"] != "exact":
            raise _Refused("unsupported_scheme")
        if scheme_of["network"] != (chain.caip2 if version == 2 else chain.v1_name):
            raise _Refused("invalid_network")
        auth = message["payload"]["authorization"]
        return _Payment(
            payer=_matching(auth["from"], _HEX_ADDRESS),
            pay_to=_matching(auth["to"], _HEX_ADDRESS),
            value=_uint256(auth["value"]),
            valid_after=_uint256(auth["validAfter"]),
            valid_before=_uint256(auth["validBefore"]),
            nonce=_matching(auth["nonce"], _HEX_NONCE),
            signature=_matching(message["payload"]["signature"], _HEX_SIGNATURE),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _Refused("invalid_payload") from exc


def _matching(value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"malformed payment field: {value!r}")
    return value


def _uint256(value: object) -> int:
    number = int(_matching(value, _DIGITS))
    if number >= 2**256:
        raise ValueError(f"out of range for uint256: {number}")
    return number


def _signer(payment: _Payment, chain: Chain) -> str | None:
    """The lower-case address that signed the authorization, or None for a broken signature."""
    signable = encode_typed_data(
        domain_data={
            "name": chain.token_name,
            "version": chain.token_version,
            "chainId": chain.chain_id,
            "verifyingContract": chain.usdc,
        },
        message_types=_AUTHORIZATION_TYPES,
        message_data={
            "from": payment.payer.lower(),
            "to": payment.pay_to.lower(),
            "value": payment.value,
            "validAfter": payment.valid_after,
            "validBefore": payment.valid_before,
            "nonce": payment.nonce,
        },
    )
    try:
        return Account.recover_message(signable, signature=payment.signature).lower()
    except (ValueError, BadSignature):
        return None


def _draw_placeholder(order: _Order, index: int) -> bytes:
    """A PNG of the ordered size showing the prompt: the sandbox's stand-in for a picture."""
    if "wide" in order.tags:
        width, height = 4200, 200
    elif "huge" in order.tags:
        width, height = 2048, 2048
    else:
        width, height = map(int, order.size.split("x"))
    seed = hashlib.sha256(f"{order.prompt}\n{index}".encode()).digest()
    noisy = order.tags & {"big", "huge"}
    if noisy:
        # Random noise: PNG cannot shrink it much, and it saves fast. #big keeps 3 bits per
        # channel (~1.5 MB at 1024x1024); #huge keeps all 8 (~12 MB at 2048x2048).
        noise = random.Random(seed).randbytes(width * height * 3)
        canvas = Image.frombytes("RGB", (width, height), noise)
        if "huge" not in order.tags:
            canvas = canvas.point(lambda v: v & 0xE0)
    elif order.source is not None:
        with Image.open(BytesIO(order.source)) as source:
            canvas = ImageOps.fit(source.convert("RGB"), (width, height))
    else:
        canvas = Image.new("RGB", (width, height), (seed[0], seed[1], seed[2]))
    draw = ImageDraw.Draw(canvas)
    short = min(width, height)
    font_size = max(14, short // 16)
    font = ImageFont.load_default(size=font_size)
    char_width = font.getlength("abcdefghijklmnopqrstuvwxyz") / 26
    line_height = font_size * 1.25
    text = textwrap.fill(
        order.prompt,
        width=max(1, int(width * 0.85 / char_width)),
        max_lines=max(1, int(height * 0.6 / line_height)),
        placeholder=" …",
    )
    outline = {"stroke_width": max(1, font_size // 14), "stroke_fill": "black"}
    draw.multiline_text(
        (width / 2, height / 2),
        text,
        font=font,
        anchor="mm",
        align="center",
        fill="white",
        **outline,
    )
    label = f"SANDBOX · {order.model.id} · {order.size}"
    if order.n > 1:
        label += f" · {index + 1}/{order.n}"
    margin = short // 40
    label_font = ImageFont.load_default(size=max(10, short // 40))
    draw.text(
        (margin, height - margin), label, font=label_font, anchor="ld", fill="white", **outline
    )
    out = BytesIO()
    canvas.save(out, "PNG", compress_level=1 if noisy else 6)  # noise: save fast
    return out.getvalue()


def _error(
    status: int,
    message: str,
    code: str,
    *,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _price(micro: int) -> dict[str, str]:
    return {"amount": usd_string(micro), "currency": "USD"}


def _b64json(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _remember(store: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Put ``key`` last in ``store`` and drop the oldest entries beyond ``limit``."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)
