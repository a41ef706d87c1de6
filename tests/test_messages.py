"""The message envelope: encode -> decode is the identity, and bad input is refused with
a DecodeError that says what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accord.errors import DecodeError
from accord.messages import Message, decode, encode

_RESERVED = {
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
    "partitionkey",
    "correlationid",
    "causationid",
    "traceparent",
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets
)
# CloudEvents extension names: lower-case letters and digits, not a known attribute.
extension_names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda name: name not in _RESERVED
)
texts = st.text(min_size=1, max_size=30)
optional_texts = st.none() | st.text(max_size=30)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    text_mode = draw(st.booleans())
    return Message(
        type=draw(texts),
        data=draw(st.text() if text_mode else json_values),
        id=draw(texts),
        source=draw(texts),
        time=draw(times),
        subject=draw(optional_texts),
        datacontenttype="text/plain"
        if text_mode
        else draw(st.sampled_from(["application/json", "application/vnd.accord+json"])),
        key=draw(optional_texts),
        correlationid=draw(optional_texts),
        causationid=draw(optional_texts),
        traceparent=draw(optional_texts),
        extensions=draw(st.dictionaries(extension_names, st.text(max_size=20), max_size=4)),
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_encode_then_decode_is_the_identity(message: Message) -> None:
    headers, body = encode(message)
    assert all(isinstance(v, str) for v in headers.values())
    decoded = decode(headers, body)
    assert decoded == message
    assert decoded.time.utcoffset() is not None


@settings(max_examples=100, deadline=None)
@given(messages())
def test_the_time_header_is_rfc3339_utc(message: Message) -> None:
    headers, _ = encode(message)
    stamp = headers["ce-time"]
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")) == message.time


def test_headers_are_cloudevents_binary_mode() -> None:
    message = Message(type="t.x", data={"a": 1}, key="k", extensions={"tenant": "acme"})
    headers, body = encode(message)
    assert headers["ce-id"] == message.id
    assert headers["ce-type"] == "t.x"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-partitionkey"] == "k"
    assert headers["ce-tenant"] == "acme"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"a": 1}


def test_decode_accepts_other_bindings_prefixes_and_bytes_values() -> None:
    got = decode(
        {
            "ce_id": b"1",
            "cloudEvents:source": "/s",
            "CE-Type": "t.x",
            "ce-specversion": "1.0",
            "Content-Type": "application/json",
        },
        b"[1]",
    )
    assert (got.id, got.source, got.type, got.data) == ("1", "/s", "t.x", [1])


def _valid_headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "ce-id": "1",
        "ce-source": "/tests",
        "ce-type": "t.x",
        "ce-specversion": "1.0",
        "content-type": "application/json",
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not None}


@pytest.mark.parametrize("missing", ["ce-id", "ce-source", "ce-type", "ce-specversion"])
def test_a_missing_required_attribute_is_named(missing: str) -> None:
    with pytest.raises(DecodeError, match=rf"missing required attribute.*{missing[3:]}"):
        decode(_valid_headers(**{missing: None}), b"{}")


def test_every_missing_attribute_is_named_at_once() -> None:
    with pytest.raises(DecodeError) as caught:
        decode({"content-type": "application/json"}, b"{}")
    assert "not a CloudEvent" in str(caught.value)
    for name in ("id", "source", "type", "specversion"):
        assert name in str(caught.value)


def test_an_unsupported_specversion_is_refused() -> None:
    with pytest.raises(DecodeError, match=r"unsupported CloudEvents specversion '0\.3'"):
        decode(_valid_headers(**{"ce-specversion": "0.3"}), b"{}")


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b'{"a": 1'])
def test_a_body_that_is_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(DecodeError, match="body is not valid JSON"):
        decode(_valid_headers(), body)


@pytest.mark.parametrize("stamp", ["yesterday", "2024-13-01T00:00:00Z", "12:00"])
def test_a_bad_time_is_refused_with_the_value(stamp: str) -> None:
    with pytest.raises(DecodeError, match="'time' is not an RFC 3339 timestamp") as caught:
        decode(_valid_headers(**{"ce-time": stamp}), b"{}")
    assert stamp in str(caught.value)


def test_non_utf8_text_is_refused() -> None:
    with pytest.raises(DecodeError, match="not UTF-8 text"):
        decode(_valid_headers(**{"content-type": "text/plain"}), b"\xff")


def test_a_time_without_offset_is_read_as_utc() -> None:
    got = decode(_valid_headers(**{"ce-time": "2024-01-02T03:04:05"}), b"null")
    assert got.time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_an_extension_may_not_shadow_an_attribute() -> None:
    with pytest.raises(ValueError, match="extension 'type'"):
        Message(type="t.x", extensions={"type": "other"})


def test_source_is_required() -> None:
    with pytest.raises(ValueError, match="source"):
        Message(type="t.x", source="")
