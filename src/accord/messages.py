"""The message envelope: CloudEvents 1.0 attributes plus Accord's extensions."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from accord.errors import DecodeError

__all__ = ["SPECVERSION", "Message", "decode", "encode", "headers_of", "new_id"]

SPECVERSION = "1.0"
_HEADER_PREFIX = "ce-"
# Prefixes other CloudEvents bindings use for the same attributes; accepted on input.
_FOREIGN_PREFIXES = ("ce_", "cloudEvents_", "cloudEvents:")
_CORE = ("id", "source", "type", "specversion", "time", "subject", "datacontenttype")
_EXTENSIONS = ("correlationid", "causationid", "partitionkey", "traceparent")
# Names an extension may not take: the attributes Message has fields for, and "data".
_RESERVED = frozenset((*_CORE, *_EXTENSIONS, "data"))
# CloudEvents: attribute names are lower-case letters and digits; a String holds no
# control characters (U+0000-U+001F, U+007F-U+009F): names that travel in messages
# (saga ids, step names) are checked against them too.
_EXTENSION_NAME = re.compile("[a-z0-9]+")
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
#: The longest ``id``, ``type`` and ``key`` Accord stores (the width of its columns).
MAX_NAME_LENGTH = 200


def new_id() -> str:
    """A new message id (a random UUID, as text)."""
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Message:
    """One message, as it travels through the outbox, the broker and the inbox.

    The fields are the CloudEvents 1.0 attributes; ``key`` is the ordering key
    (the CloudEvents ``partitionkey`` extension): messages with the same key
    reach a consumer in commit order. ``data`` is any JSON-serialisable value.
    The ``id`` is stable across retries and is what the inbox deduplicates on.
    With a non-JSON ``datacontenttype`` (``text/plain``...), ``data`` is the text itself.
    ``extensions`` are further CloudEvents extension attributes (lower-case letters
    and digits by the spec); they may not reuse the name of an attribute above.
    """

    type: str
    data: Any = None
    id: str = field(default_factory=new_id)
    source: str = "accord"
    time: datetime = field(default_factory=_now)
    subject: str | None = None
    datacontenttype: str = "application/json"
    key: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)
    specversion: str = SPECVERSION

    def __post_init__(self) -> None:
        if not self.type:
            raise ValueError("Message.type must be a non-empty string")
        if not self.id:
            raise ValueError("Message.id must be a non-empty string")
        if not self.source:
            raise ValueError("Message.source must be a non-empty string (CloudEvents requires it)")
        for name in ("id", "type", "key"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_NAME_LENGTH:
                raise ValueError(
                    f"Message.{name} is {len(value)} characters long; "
                    f"Accord stores at most {MAX_NAME_LENGTH}"
                )
        if self.extensions:
            self._check_extensions()
        texts = (
            self.id, self.source, self.type, self.specversion, self.datacontenttype,
            self.subject, self.key, self.correlationid, self.causationid, self.traceparent,
            *self.extensions.values(),
        )  # fmt: skip
        if CONTROL_CHARACTERS.search("".join(text for text in texts if text)):
            named = {
                "id": self.id, "source": self.source, "type": self.type,
                "specversion": self.specversion, "datacontenttype": self.datacontenttype,
                "subject": self.subject, "partitionkey": self.key,
                "correlationid": self.correlationid, "causationid": self.causationid,
                "traceparent": self.traceparent, **self.extensions,
            }  # fmt: skip
            name = next(n for n, v in named.items() if v and CONTROL_CHARACTERS.search(v))
            raise ValueError(
                f"attribute {name!r} holds a control character, which CloudEvents "
                "does not allow in an attribute (and brokers alter)"
            )

    def _check_extensions(self) -> None:
        shadowing = sorted(set(self.extensions) & _RESERVED)
        if shadowing:
            raise ValueError(
                f"extension {shadowing[0]!r} has the name of a message attribute; "
                "set the attribute itself or rename the extension"
            )
        for name, value in self.extensions.items():
            if not isinstance(name, str) or not _EXTENSION_NAME.fullmatch(name):
                raise ValueError(
                    f"extension name {name!r}: CloudEvents allows only lower-case "
                    "letters a-z and digits 0-9"
                )
            if not isinstance(value, str):
                raise ValueError(
                    f"extension {name!r} is a {type(value).__name__}; extensions travel "
                    "as text: pass str(value)"
                )

    def caused(self, type: str, data: Any = None, **kwargs: Any) -> Message:
        """A new message caused by this one: same correlation id, causation = this id."""
        kwargs.setdefault("correlationid", self.correlationid or self.id)
        kwargs.setdefault("causationid", self.id)
        kwargs.setdefault("traceparent", self.traceparent)
        return Message(type=type, data=data, **kwargs)

    def with_(self, **changes: Any) -> Message:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def attributes(self) -> dict[str, str]:
        """The CloudEvents attributes (without data) as strings, absent ones left out."""
        attrs = {
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "specversion": self.specversion,
            "time": _rfc3339(self.time),
            "datacontenttype": self.datacontenttype,
        }
        optional = {
            "subject": self.subject,
            "partitionkey": self.key,
            "correlationid": self.correlationid,
            "causationid": self.causationid,
            "traceparent": self.traceparent,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        attrs.update(self.extensions)
        return attrs


def _rfc3339(moment: datetime) -> str:
    # Always UTC: an offset with seconds (old zoneinfo offsets) is not RFC 3339.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _is_json(content_type: str) -> bool:
    return "json" in content_type.lower()


def headers_of(message: Message) -> dict[str, str]:
    """The CloudEvents binary-mode headers of ``message``: its attributes as
    ``ce-`` headers, its content type as ``content-type``."""
    headers = {}
    for name, value in message.attributes().items():
        if name == "datacontenttype":
            headers["content-type"] = value
        else:
            headers[_HEADER_PREFIX + name] = value
    return headers


def encode(message: Message) -> tuple[dict[str, str], bytes]:
    """CloudEvents binary mode: attributes as ``ce-`` headers, data as the body
    (JSON for JSON content types; the text itself, UTF-8, for others)."""
    headers = headers_of(message)
    data = message.data
    if _is_json(message.datacontenttype) or not isinstance(data, str | bytes | None):
        try:
            body = json.dumps(data, separators=(",", ":"), default=str, allow_nan=False).encode()
        except ValueError as exc:  # NaN or an infinity: no JSON parser reads them back
            raise ValueError(f"message {message.id} has data that is not JSON: {exc}") from None
    elif data is None:
        body = b""
    else:
        body = data if isinstance(data, bytes) else data.encode()
    return headers, body


def _parse_time(value: str) -> datetime:
    try:
        # RFC 3339 allows a lower-case "t" and "z".
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise DecodeError(f"attribute 'time' is not an RFC 3339 timestamp: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def decode(headers: Mapping[str, Any], body: bytes) -> Message:
    """Parse a CloudEvents binary-mode message; raise DecodeError saying what is wrong."""
    attrs: dict[str, str] = {}
    for raw_name, raw_value in headers.items():
        name = str(raw_name)
        try:
            value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        except UnicodeDecodeError:
            raise DecodeError(f"header {name!r} is not UTF-8 text") from None
        lowered = name.lower()
        if lowered == "content-type":
            attrs["datacontenttype"] = value
            continue
        for prefix in (_HEADER_PREFIX, *_FOREIGN_PREFIXES):
            if lowered.startswith(prefix.lower()):
                attrs[lowered[len(prefix) :]] = value
                break
    missing = [a for a in ("id", "source", "type", "specversion") if not attrs.get(a)]
    if missing:
        raise DecodeError(f"not a CloudEvent: missing required attribute(s) {', '.join(missing)}")
    if attrs["specversion"] != SPECVERSION:
        raise DecodeError(f"unsupported CloudEvents specversion {attrs['specversion']!r}")
    content_type = attrs.get("datacontenttype", "application/json")
    if _is_json(content_type):
        if body == b"":
            data: Any = None
        else:
            try:
                data = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DecodeError(f"body is not valid JSON ({exc})") from exc
            except RecursionError:
                raise DecodeError("body is JSON nested too deeply to read") from None
    else:
        try:
            data = body.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"body of type {content_type!r} is not UTF-8 text") from exc
    if "data" in attrs:
        raise DecodeError("a header names a CloudEvents attribute 'data', which is reserved")
    try:
        return _message(attrs, content_type, data)
    except ValueError as exc:
        raise DecodeError(f"not a valid CloudEvent: {exc}") from None


def _message(attrs: dict[str, str], content_type: str, data: Any) -> Message:
    known = set(_CORE) | set(_EXTENSIONS)
    return Message(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        specversion=attrs["specversion"],
        time=_parse_time(attrs["time"]) if "time" in attrs else _now(),
        subject=attrs.get("subject"),
        datacontenttype=content_type,
        key=attrs.get("partitionkey"),
        correlationid=attrs.get("correlationid"),
        causationid=attrs.get("causationid"),
        traceparent=attrs.get("traceparent"),
        extensions={k: v for k, v in attrs.items() if k not in known},
        data=data,
    )
