"""The message envelope: encode -> decode is the identity, and bad input is refused with
a DecodeError that says what is wrong."""

from __future__ import annotations

import json
import re
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
# CloudEvents attribute values hold no control characters (Unicode category Cc).
attribute_chars = st.characters(exclude_categories=("Cc", "Cs"))
texts = st.text(attribute_chars, min_size=1, max_size=30)
optional_texts = st.none() | st.text(attribute_chars, max_size=30)


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
        extensions=draw(
            st.dictionaries(extension_names, st.text(attribute_chars, max_size=20), max_size=4)
        ),
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


@given(
    st.sampled_from(["id", "type", "source", "subject", "key", "correlationid", "traceparent"]),
    st.characters(categories=("Cc",)),
)
def test_a_control_character_in_an_attribute_is_refused(attribute: str, control: str) -> None:
    """CloudEvents strings hold no control characters, and brokers alter them (NATS
    turns CR LF into spaces): a message carrying one is refused, naming the attribute."""
    name = "partitionkey" if attribute == "key" else attribute
    with pytest.raises(ValueError, match=f"attribute '{name}' holds a control character"):
        Message(**{"type": "t.x", attribute: f"a{control}b"})


def test_a_control_character_in_an_extension_value_is_refused() -> None:
    with pytest.raises(ValueError, match="attribute 'tenant' holds a control character"):
        Message(type="t.x", extensions={"tenant": "a\x00b"})


@pytest.mark.parametrize("attribute", ["id", "type", "key"])
def test_an_id_type_or_key_longer_than_accord_stores_is_refused(attribute: str) -> None:
    Message(**{"type": "t.x", attribute: "x" * 200})
    with pytest.raises(ValueError, match=f"Message.{attribute} is 201 characters long"):
        Message(**{"type": "t.x", attribute: "x" * 201})


@pytest.mark.parametrize("name", ["tenantId", "", "tenant-id", "tenant_id"])
def test_an_extension_name_must_be_lower_case_letters_and_digits(name: str) -> None:
    with pytest.raises(ValueError, match="only lower-case letters a-z and digits"):
        Message(type="t.x", extensions={name: "a"})


def test_an_extension_value_must_be_text() -> None:
    with pytest.raises(ValueError, match=r"extension 'count' is a int; .* pass str"):
        Message(type="t.x", extensions={"count": 5})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_data_that_is_not_json_is_refused_when_encoded(value: float) -> None:
    """No strict JSON parser reads NaN or an infinity back: encode refuses them."""
    message = Message(type="t.x", data={"x": [value]})
    with pytest.raises(ValueError, match=f"message {message.id} has data that is not JSON"):
        encode(message)


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        ("ce-id", "x" * 250, "Message.id is 250 characters long"),
        ("ce-subject", "line1\r\nline2", "attribute 'subject' holds a control character"),
        ("ce-tenant", "a\x00b", "attribute 'tenant' holds a control character"),
        ("ce-tenant-id", "a", "extension name 'tenant-id'"),
        ("ce-tenant", b"\xff\xfe", "header 'ce-tenant' is not UTF-8 text"),
    ],
)
def test_an_invalid_cloudevent_is_a_decode_error_that_says_why(
    header: str, value: str | bytes, reason: str
) -> None:
    """A consumer dead-letters a DecodeError as undecodable; a ValueError or a
    UnicodeDecodeError would have escaped the Delivery and its reason with it."""
    with pytest.raises(DecodeError, match=re.escape(reason)):
        decode(_valid_headers(**{header: value}), b"{}")


def test_a_lower_case_t_and_z_in_the_time_are_rfc3339() -> None:
    got = decode(_valid_headers(**{"ce-time": "2024-01-01t10:00:00z"}), b"{}")
    assert got.time == datetime(2024, 1, 1, 10, tzinfo=UTC)
