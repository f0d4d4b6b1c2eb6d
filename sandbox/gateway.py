"""The aiohttp app: BlockRun's image routes, 202 jobs and the pictures it hands out.

The gateway shares the bot's event loop in ``imagebot demo``, so nothing CPU-heavy runs on it:
request bodies (megabytes of base64 input images) are parsed, pictures drawn and encoded, and
answers carrying pictures serialised, all in threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from aiohttp import web

from bot.chains import BASE_SEPOLIA, Chain
from bot.money import usd_string
from sandbox.orders import BadRequest, Order, parse_order
from sandbox.payments import SANDBOX_PAY_TO, Facilitator, Payment, Refused, Settlement
from sandbox.pictures import draw_placeholder, png_data_uri

DEFAULT_SLOW_MODELS = frozenset({"openai/gpt-image-2", "google/nano-banana-pro"})

_MAX_ENTRIES = 1000  # jobs and stored images
_MAX_IMAGE_BYTES = 256 * 2**20
_RENDER_CACHE_SIZE = 32
_MAX_BODY_BYTES = 64 * 2**20
_FORCED_SLOW = frozenset({"slow", "fail", "never", "settlefail"})
_API_PREFIXES = ("", "/api")

_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass
class _Job:
    """An order answered 202: drawn and settled on the first poll that sees it completed."""

    id: str
    order: Order
    payment: Payment
    resource_url: str
    submitted_at: float  # time.monotonic()
    data: list[dict[str, str | bytes]] | None = None
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
        picture_origin: str | None = None,
    ) -> None:
        """``picture_origin`` is where picture links point (tests: a public address routed
        back here, as a CDN would serve them); by default the sandbox's own origin."""
        self.picture_origin = picture_origin
        self.images_served = 0  # picture links fetched
        self.facilitator = Facilitator(pay_to=pay_to, chain=chain, version=x402_version)
        self.latency = latency
        self.job_seconds = job_seconds
        self.slow_models = slow_models
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._image_bytes = 0
        self._rendered: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._data_uris: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.url = ""  # the API root, once started
        self.app = web.Application(client_max_size=_MAX_BODY_BYTES)
        for prefix in _API_PREFIXES:  # BlockRun's API root is https://blockrun.ai/api
            self.app.add_routes(
                [
                    web.post(f"{prefix}/v1/images/generations", self._generate),
                    web.post(f"{prefix}/v1/images/image2image", self._edit),
                    web.get(f"{prefix}/v1/images/generations/{{job_id}}", self._poll),
                ]
            )
        self.app.add_routes(
            [
                web.get("/images/{image_id}.png", self._image),
                web.get("/sandbox/settlements", self._settlements),
            ]
        )

    @property
    def x402_version(self) -> int:
        """1 or 2: how quotes, payments and receipts are framed."""
        return self.facilitator.version

    @property
    def settlements(self) -> list[Settlement]:
        """Every charge settled so far, oldest first."""
        return self.facilitator.settlements

    @property
    def payments_received(self) -> int:
        """Signed payments accepted so far, settled or not (a paid request may still be running)."""
        return self.facilitator.payments_received

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the API root URL."""
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        """Stop listening; jobs and settlements stay readable."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _generate(self, request: web.Request) -> web.Response:
        return await self._order(request, edit=False)

    async def _edit(self, request: web.Request) -> web.Response:
        return await self._order(request, edit=True)

    async def _order(self, request: web.Request, *, edit: bool) -> web.Response:
        try:
            order = await asyncio.to_thread(parse_order, await request.read(), edit=edit)
        except BadRequest as exc:
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
            payment = await self.facilitator.verify(header, order.price_micro)
            if "nofunds" in order.tags:
                raise Refused("insufficient_funds")
        except Refused as exc:
            return self._payment_required(resource_url, order, str(exc))
        self.facilitator.spend(payment)  # no await since verify's replay check: spent once
        await asyncio.sleep(self.latency)
        if "servererror" in order.tags:
            return _error(500, "The image provider failed", "server_error", kind="server_error")
        if "timeout" in order.tags:
            return _error(504, "Image generation timed out", "timeout", kind="server_error")
        if order.model.id in self.slow_models or order.tags & _FORCED_SLOW:
            return self._submit(request, order, payment, resource_url)
        data = await self._deliver(request, order)
        settlement = self.facilitator.settle(payment, order.price_micro, order.model.id)
        return await _json_in_thread(
            self._result(order, data, settlement, "settled"),
            headers=self.facilitator.receipt(settlement),
        )

    def _submit(
        self, request: web.Request, order: Order, payment: Payment, resource_url: str
    ) -> web.Response:
        job = _Job(uuid.uuid4().hex, order, payment, resource_url, time.monotonic())
        _remember(self._jobs, job.id, job, _MAX_ENTRIES)
        prefix = "/api" if request.path.startswith("/api/") else ""
        body = {
            "id": job.id,
            "status": "queued",
            "poll_url": f"{prefix}/v1/images/generations/{job.id}",  # relative, as BlockRun's
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
            payment = self.facilitator.decode(header)
        except Refused as exc:
            return self._payment_required(job.resource_url, job.order, str(exc))
        if payment.signature.lower() != job.payment.signature.lower():
            return self._payment_required(job.resource_url, job.order, "payment_mismatch")
        status = self._job_status(job)
        if status == "failed":
            message = "The image provider failed (sandbox #fail); nothing was charged"
            return web.json_response(
                {"id": job.id, "status": status, "error": {"message": message}}
            )
        if status != "completed":  # BlockRun: 202 until done (blockrun-llm polls on 202)
            return web.json_response({"id": job.id, "status": status}, status=202)
        if "settlefail" in job.order.tags and job.settlement is None:
            return web.json_response(
                {"error": "Payment settlement failed", "details": "insufficient_funds"},
                status=402,
            )
        if job.data is None:
            data = await self._deliver(request, job.order)
            job.data = job.data or data  # a concurrent poll may have drawn them first
        # No await between this check and the settling: concurrent polls settle once.
        if job.settlement is None:
            job.settlement = self.facilitator.settle(
                job.payment, job.order.price_micro, job.order.model.id
            )
            payment_status, headers = "settled", self.facilitator.receipt(job.settlement)
        else:
            payment_status, headers = "already_settled", None
        body = {
            "id": job.id,
            "status": status,
            **self._result(job.order, job.data, job.settlement, payment_status),
        }
        return await _json_in_thread(body, headers=headers)

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
        self.images_served += 1
        return web.Response(body=png, content_type="image/png")

    async def _settlements(self, request: web.Request) -> web.Response:
        rows = [asdict(settlement) for settlement in self.settlements]
        total = sum(settlement.amount_micro for settlement in self.settlements)
        # Load tests settle thousands of times: a list that long is no small answer.
        return await _json_in_thread({"settlements": rows, "total_micro": total})

    def _payment_header(self, request: web.Request) -> str | None:
        if self.x402_version == 2 and "PAYMENT-SIGNATURE" in request.headers:
            return request.headers["PAYMENT-SIGNATURE"]
        return request.headers.get("X-PAYMENT")

    def _payment_required(self, resource_url: str, order: Order, error: str) -> web.Response:
        description = f"{order.model.id} image, {order.size}, n={order.n}"
        body, headers = self.facilitator.quote(resource_url, description, order.price_micro, error)
        return web.json_response(body, status=402, headers=headers)

    def _result(
        self, order: Order, data: list[dict[str, str | bytes]], settlement: Settlement, status: str
    ) -> dict[str, Any]:
        return {
            "created": int(settlement.settled_at),
            "data": data,
            "price": _price(order.price_micro),
            "payment": {
                "status": status,
                "tx_hash": settlement.tx_hash,
                "network": self.facilitator.network,
            },
        }

    async def _deliver(self, request: web.Request, order: Order) -> list[dict[str, str | bytes]]:
        """Draw the order's pictures and hand them out the way BlockRun does for its model (a
        data URI comes as bytes, for ``_json_bytes``)."""
        keys = [_render_key(order, index) for index in range(order.n)]
        pngs = await asyncio.gather(
            *(self._render(order, index, key) for index, key in enumerate(keys))
        )
        data: list[dict[str, str | bytes]] = []
        for key, png in zip(keys, pngs, strict=True):
            url: str | bytes
            if order.model.id.startswith("openai/gpt-image"):
                url = self._data_uris.get(key) or await asyncio.to_thread(png_data_uri, png)
                _remember(self._data_uris, key, url, _RENDER_CACHE_SIZE)
            else:
                origin = self.picture_origin or request.url.origin()
                url = f"{origin}/images/{self._store_image(png)}.png"
            item: dict[str, str | bytes] = {"url": url}
            if order.model.id == "openai/dall-e-3":
                item["revised_prompt"] = f"A sandbox placeholder showing: {order.prompt}"
            data.append(item)
        return data

    async def _render(self, order: Order, index: int, key: tuple[object, ...]) -> bytes:
        png = self._rendered.get(key)
        if png is None:
            png = await asyncio.to_thread(draw_placeholder, order, index)
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


async def _json_in_thread(
    body: dict[str, Any], *, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer serialised in a thread: answers with pictures carry megabytes of base64."""
    raw = await asyncio.to_thread(_json_bytes, body)
    return web.json_response(body=raw, headers=headers)


def _json_bytes(value: dict[str, Any]) -> bytes:
    """``value`` as JSON; the data URIs in it, given as bytes (base64: nothing to escape), are
    spliced in as they are, copied once: that saves a load test most of the sandbox's CPU."""
    uris: list[bytes] = []
    mark = f"picture-{secrets.token_hex(8)}"

    def splice(uri: object) -> str:
        if not isinstance(uri, bytes):
            raise TypeError(f"{type(uri).__name__} is not JSON")
        uris.append(uri)
        return mark

    pieces = json.dumps(value, default=splice).encode().split(f'"{mark}"'.encode())
    joined = [pieces[0]]
    for uri, piece in zip(uris, pieces[1:], strict=True):
        joined += (b'"', uri, b'"', piece)
    return b"".join(joined)


def _render_key(order: Order, index: int) -> tuple[object, ...]:
    return (order.model.id, order.size, order.prompt, order.n, index, order.source_digest)


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


def _remember(store: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Put ``key`` last in ``store`` and drop the oldest entries beyond ``limit``."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)
