"""Options every transport checks when it is made, alike: a number of seconds is a finite
number above 0 (not a bool, not NaN), a count a whole number of at least 1. Before, each
broker broke its own way, late: NaN ack_wait or claim_idle raised a bare ValueError at
subscribe, a Redis maxlen of -1 the client's own DataError at every publish, a maxlen of
0 trimmed each message as it was added (confirmed, then lost), a NaN publish_timeout on
RabbitMQ failed every publish as an outage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import NATS_URL, RABBIT_URL, REDIS_URL

from accord.errors import ConfigurationError
from accord.transports.base import Transport
from accord.transports.nats import NatsTransport
from accord.transports.rabbitmq import RabbitTransport
from accord.transports.redis import RedisTransport
from accord.transports.sql import SqlTransport

NAN, INF = float("nan"), float("inf")
NOT_SECONDS = [0, -1, NAN, INF, True, "5"]
NOT_COUNTS = [0, -1, 2.5, NAN, True]


def _sql(**options: Any) -> SqlTransport:
    return SqlTransport("sqlite+aiosqlite:///unused.db", **options)


def _rabbit(**options: Any) -> RabbitTransport:
    return RabbitTransport(RABBIT_URL, **options)


def _nats(**options: Any) -> NatsTransport:
    return NatsTransport(NATS_URL, **options)


def _redis(**options: Any) -> RedisTransport:
    return RedisTransport(REDIS_URL, **options)


SECONDS: list[tuple[Callable[..., Transport], str]] = [
    *[(_rabbit, n) for n in ("publish_timeout", "connect_timeout")],
    *[(_nats, n) for n in ("ack_wait", "publish_timeout", "connect_timeout", "duplicate_window")],
    *[(_redis, n) for n in ("claim_idle", "publish_timeout", "connect_timeout")],
    *[(_sql, n) for n in ("poll_interval", "lease", "cleanup_interval")],
]
COUNTS: list[tuple[Callable[..., Transport], str]] = [
    (_rabbit, "max_message_size"),
    (_redis, "maxlen"),
    (_sql, "cleanup_batch"),
]


@pytest.mark.parametrize("value", NOT_SECONDS, ids=repr)
@pytest.mark.parametrize(("make", "option"), SECONDS, ids=[n for _, n in SECONDS])
def test_a_number_of_seconds_that_is_not_one_is_refused(
    make: Callable[..., Transport], option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        make(**{option: value})


@pytest.mark.parametrize("value", NOT_COUNTS, ids=repr)
@pytest.mark.parametrize(("make", "option"), COUNTS, ids=[n for _, n in COUNTS])
def test_a_count_that_is_not_one_is_refused(
    make: Callable[..., Transport], option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        make(**{option: value})


@pytest.mark.parametrize(
    "options",
    [
        {"reconnect_interval": NAN},
        {"reconnect_interval": -1},
        {"stop_timeout": NAN},
        {"stop_timeout": -1},
    ],
    ids=repr,
)
def test_rabbitmq_pauses_may_be_0_but_must_be_numbers(options: dict[str, Any]) -> None:
    RabbitTransport(RABBIT_URL, reconnect_interval=0, stop_timeout=0)
    with pytest.raises(ConfigurationError):
        RabbitTransport(RABBIT_URL, **options)


def test_nats_stream_limits_take_jetstreams_no_limit_values_but_no_nonsense() -> None:
    for fine in ({"max_age": 0}, {"max_age": None}, {"max_bytes": -1}, {"max_bytes": 0}):
        NatsTransport(NATS_URL, **fine)  # type: ignore[arg-type]
    for bad in ({"max_age": NAN}, {"max_age": -1}, {"max_bytes": NAN}, {"max_bytes": True}):
        with pytest.raises(ConfigurationError):
            NatsTransport(NATS_URL, **bad)  # type: ignore[arg-type]
