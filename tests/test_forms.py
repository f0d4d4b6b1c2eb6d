"""The fakes' multipart reader (``local.form_parts``): what aiohttp's client sends, read back
part by part, and malformed bodies refused."""

from __future__ import annotations

import os

import aiohttp
import pytest
from aiohttp import web
from local import FormPart, form_parts, serving


async def _parts_of(body: bytes | aiohttp.FormData, content_type: str | None = None) -> object:
    """What ``form_parts`` makes of ``body`` posted to a local server: parts or "malformed"."""
    seen: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            seen.append(await form_parts(request))
        except ValueError:
            seen.append("malformed")
        return web.Response()

    headers = {} if content_type is None else {"Content-Type": content_type}
    async with (
        serving(("POST", "/", handler)) as url,
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        assert response.status == 200
    return seen[0]


async def test_reads_fields_and_files_as_aiohttp_sends_them() -> None:
    photo = os.urandom(300_000) + b"\r\n--not-the-boundary\r\n"
    form = aiohttp.FormData({"chat_id": "7", "caption": "ünïcode · $0.04"})
    form.add_field("photo", photo, filename="photo.png", content_type="image/png")
    form.add_field("document", b"", filename="empty.bin")
    assert await _parts_of(form) == [
        FormPart("chat_id", None, "text/plain; charset=utf-8", b"7"),
        FormPart("caption", None, "text/plain; charset=utf-8", "ünïcode · $0.04".encode()),
        FormPart("photo", "photo.png", "image/png", photo),
        FormPart("document", "empty.bin", "application/octet-stream", b""),
    ]


async def test_preamble_quoted_boundary_and_nameless_parts() -> None:
    body = (
        b"preamble\r\n--b0\r\nContent-Disposition: form-data\r\n\r\nno name\r\n"
        b"--b0\r\n\r\nno headers\r\n"
        b'--b0  \r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b0--\r\nepilogue'
    )
    parts = await _parts_of(body, 'multipart/form-data; boundary="b0"')
    assert parts == [FormPart("a", None, None, b"1")]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'--b0\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b0--',
            "multipart/form-data",
        ),
        (b"no boundary in here", "multipart/form-data; boundary=b0"),
        (
            b'--b0\r\nContent-Disposition: form-data; name="a"\r\n\r\ncut short',
            "multipart/form-data; boundary=b0",
        ),
        (b"--b0\r\nno colon\r\n\r\n1\r\n--b0--", "multipart/form-data; boundary=b0"),
    ],
    ids=["no boundary parameter", "boundary missing", "truncated", "bad header"],
)
async def test_malformed_bodies_are_refused(body: bytes, content_type: str) -> None:
    assert await _parts_of(body, content_type) == "malformed"


async def test_a_body_over_the_apps_size_cap_is_a_413() -> None:
    async def handler(request: web.Request) -> web.Response:
        await form_parts(request)
        return web.Response()

    form = aiohttp.FormData()
    form.add_field("photo", bytes(2**20 + 1), filename="big.png")  # aiohttp's cap: 1 MiB
    async with (
        serving(("POST", "/", handler)) as url,
        aiohttp.ClientSession() as session,
        session.post(url, data=form) as response,
    ):
        assert response.status == 413
