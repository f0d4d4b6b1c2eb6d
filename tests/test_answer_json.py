"""A paid answer's data-URI pictures decoded from the body's bytes: same meaning as json.loads."""

from __future__ import annotations

import base64
import itertools
import json
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.answer_json import MAX_OPENINGS, AnswerDecoder, loads, parse_answer


def data_uri(picture: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(picture).decode()}"


@given(
    pictures=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    note=st.text(max_size=40),
)
def test_every_data_uri_picture_becomes_its_bytes_and_the_rest_is_unchanged(
    pictures: list[bytes], note: str
) -> None:
    answer = {
        "created": 1,
        "data": [{"url": data_uri(picture), "revised_prompt": note} for picture in pictures],
        "payment": {"tx_hash": "0xabc", "note": note},
    }
    parsed = parse_answer(json.dumps(answer).encode())
    assert [item["url"] for item in parsed["data"]] == pictures
    assert [item["revised_prompt"] for item in parsed["data"]] == [note] * len(pictures)
    assert parsed["payment"] == answer["payment"]


def test_escaped_slashes_leave_the_uri_as_text_for_the_slower_path() -> None:
    uri = data_uri(b"\xff" * 30)  # base64 of 0xff is '////…'
    body = json.dumps({"data": [{"url": uri}]}).replace("/", "\\/").encode()
    assert parse_answer(body) == {"data": [{"url": uri}]}


def test_a_uri_inside_other_text_or_outside_data_is_never_a_picture() -> None:
    uri = data_uri(b"picture")
    answer = {
        "error": f'see "{uri}" here',
        "data": [{"url": f"prefix {uri}"}],
        "other": [uri],
    }
    parsed = parse_answer(json.dumps(answer).encode())
    assert parsed["data"][0]["url"] == f"prefix {uri}"
    assert parsed["error"].startswith("see ")
    assert isinstance(parsed["other"][0], str)  # decoded, but only data items take pictures


def test_a_forged_marker_is_only_text() -> None:
    forged = "imagebot-picture-0000000000000000-0"
    parsed = parse_answer(json.dumps({"data": [{"url": forged}]}).encode())
    assert parsed == {"data": [{"url": forged}]}


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"data": [', b"[" * 100_000 + b"]" * 100_000],
)
def test_what_is_not_json_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(body)


def test_nesting_is_refused_by_count_or_by_the_recursion_limit_never_crashes() -> None:
    limit = sys.getrecursionlimit()  # eth-account's py_ecc raises it, once imported
    sys.setrecursionlimit(1_000)
    try:
        assert loads(b"[" * 500 + b"{}" + b"]" * 500) is not None
        with pytest.raises(ValueError):  # over Python's limit: ValueError, not RecursionError
            loads(b"[" * 5_000 + b"]" * 5_000)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ValueError):  # counted before parsing, whatever the limit
        loads(b"[" * (MAX_OPENINGS + 1))


def test_a_broken_payload_stays_text() -> None:
    body = b'{"data": [{"url": "data:image/png;base64,ab$d"}]}'
    assert parse_answer(body) == {"data": [{"url": "data:image/png;base64,ab$d"}]}


def fed_in_chunks(body: bytes, cuts: list[int]) -> Any:
    decoder = AnswerDecoder()
    edges = [0, *sorted({cut % (len(body) + 1) for cut in cuts}), len(body)]
    for start, end in itertools.pairwise(edges):
        decoder.feed(body[start:end])
    return decoder.finish().parse()


@given(
    pictures=st.lists(st.binary(max_size=200), min_size=1, max_size=3),
    note=st.sampled_from(["", "x", 'say "data:image/png;base64,QUJD" twice', "data:image/"]),
    cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=12),
)
def test_any_split_into_chunks_reads_the_same(
    pictures: list[bytes], note: str, cuts: list[int]
) -> None:
    answer = {
        "note": note,
        "data": [{"url": data_uri(p), "revised_prompt": note} for p in pictures],
    }
    parsed = fed_in_chunks(json.dumps(answer).encode(), cuts)
    assert [item["url"] for item in parsed["data"]] == pictures
    assert parsed["note"] == note


@given(
    picture=st.binary(min_size=1, max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=12),
    broken=st.sampled_from(["\\/", "$", "=", "==A", "Q"]),
)
def test_a_payload_broken_anywhere_reads_as_plain_json_in_any_split(
    picture: bytes, cuts: list[int], broken: str
) -> None:
    """After a good picture, a bad one (escapes, stray characters, padding in the middle, a
    part quartet) makes the decoder hand back the text exactly as json.loads reads it."""
    prefix, _, payload = data_uri(picture * 3).partition(",")
    bad = f"{prefix},{payload[: len(payload) // 2]}{broken}{payload[len(payload) // 2 :]}"
    body = json.dumps({"data": [{"url": data_uri(picture)}, {"url": "?"}], "after": "x"})
    body = body.replace('"?"', f'"{bad}"').encode()  # as it is: json.dumps would escape it
    try:
        expected = json.loads(body)
    except ValueError:
        with pytest.raises(ValueError):
            fed_in_chunks(body, cuts)
        return
    assert fed_in_chunks(body, cuts) == expected
