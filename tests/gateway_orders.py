"""What the bot asked the sandbox gateway for, as the gateway read it: the pictures of each edit."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sandbox import Sandbox


@dataclass(frozen=True)
class Order:
    """A request the bot sent to the sandbox, as the sandbox read it."""

    path: str
    paid: bool  # with a signed payment (the bot first asks unpaid, for the quote)
    model: str | None
    inputs: tuple[bytes, ...]  # the decoded input images of an edit
    mask: bytes | None
    body: dict[str, Any] = field(default_factory=dict, compare=False)  # the JSON as sent


def record_orders(gateway: Sandbox) -> list[Order]:
    """Note every POST the bot sends ``gateway`` (before it starts) in the list returned."""
    orders: list[Order] = []
    gateway.app.middlewares.append(_recorder(orders))
    return orders


def paid(orders: list[Order]) -> list[Order]:
    return [order for order in orders if order.paid]


def _data_uri_bytes(uri: str) -> bytes:
    return base64.b64decode(uri.partition(",")[2])


def _recorder(orders: list[Order]) -> Middleware:
    """An aiohttp middleware that notes what the bot asked the sandbox for (it changes nothing)."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            body = json.loads(await request.read())
            images = body.get("image") or []
            images = [images] if isinstance(images, str) else images
            mask = body.get("mask")
            orders.append(
                Order(
                    request.path,
                    "PAYMENT-SIGNATURE" in request.headers or "X-PAYMENT" in request.headers,
                    body.get("model"),
                    tuple(_data_uri_bytes(uri) for uri in images),
                    _data_uri_bytes(mask) if mask else None,
                    body,
                )
            )
        return await handler(request)

    return record
