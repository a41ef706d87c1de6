"""What a saga definition, an orchestrator and a start refuse, before anything is
written: each refusal names what is wrong and how to put it right."""

from __future__ import annotations

import math
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema_sagas import sagas
from accord.errors import ConfigurationError, DuplicateError
from accord.sagas import Orchestrator, Retry, Saga, command
from accord.transports.sql import SqlTransport


async def _noop(_ctx: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("", "one word"),
        ("a b", "one word"),
        ("a>b", "one word"),
        ("a\x01", "one word"),
        ("a.b", "one word"),
        ("n" * 183, "at most 182"),
    ],
)
def test_a_saga_name_must_be_a_word_its_reply_type_can_hold(name: str, fault: str) -> None:
    with pytest.raises(ConfigurationError, match=fault):
        Saga(name)


def test_the_longest_saga_name_still_makes_a_valid_reply_type() -> None:
    saga = Saga("n" * 182)
    assert len(saga.reply_type) == 200


@pytest.mark.parametrize("name", ["orders:v2", "trip/eu", "a+b", "réservation"])
def test_names_every_transport_routes_stay_valid(name: str) -> None:
    assert Saga(name).reply_type == f"accord.saga.{name}.reply"


def test_a_compensation_may_wait_for_ever_and_a_step_name_is_plain_text() -> None:
    assert Saga("x", compensation_timeout=None).compensation_timeout is None
    with pytest.raises(ConfigurationError, match="holds a control character"):
        Saga("x").step("reserve\nseat", command("t.r"))


@pytest.mark.parametrize(
    ("timeout", "fault"),
    [
        (math.inf, r"up to ten years \(None waits for ever\), not inf"),
        (math.nan, "not nan"),
        (1e12, "not 1000000000000.0"),
        (0, "not 0"),
        (-1, "not -1"),
        ("10", "not '10'"),
    ],
)
def test_a_step_timeout_is_a_positive_finite_number_of_seconds(timeout: Any, fault: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"timeout of step 'r' of saga 'x'.*{fault}"):
        Saga("x").step("r", command("t.r"), compensate=command("t.u"), timeout=timeout)


def test_a_step_may_wait_for_ever() -> None:
    assert Saga("x").step("r", command("t.r"), timeout=None).steps[0].timeout is None


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"stuck_after": 0}, "stuck_after must be an int of at least 1, not 0"),
        ({"stuck_after": -1}, "stuck_after must be an int of at least 1, not -1"),
        ({"compensation_timeout": 0}, "compensation_timeout of saga 'x' must be a positive"),
        ({"compensation_timeout": -1}, "compensation_timeout of saga 'x' must be a positive"),
    ],
)
def test_saga_options_are_checked(options: dict[str, Any], fault: str) -> None:
    with pytest.raises(ConfigurationError, match=fault):
        Saga("x", **options)


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"max_attempts": 0}, "max_attempts must be an int of at least 1"),
        ({"max_attempts": -1}, "max_attempts must be an int of at least 1"),
        ({"base": -1}, "base must be a finite number of seconds of 0 or more, not -1"),
        ({"cap": math.nan}, "cap must be a finite number"),
    ],
)
def test_a_retry_policy_is_checked(options: dict[str, Any], fault: str) -> None:
    with pytest.raises(ConfigurationError, match=fault):
        Retry(**options)


@pytest.mark.parametrize(
    ("step", "action", "fault"),
    [
        ("", command("t.r"), "needs a name"),
        ("s" * 201, command("t.r"), "201 characters long; at most 200"),
        ("r", "hotels.reserve", r"wrap a command to a participant in command\('hotels.reserve'\)"),
        ("r", None, "must be command"),
    ],
)
def test_a_step_needs_a_name_and_an_action(step: str, action: Any, fault: str) -> None:
    with pytest.raises(ConfigurationError, match=fault):
        Saga("x").step(step, action)


@pytest.mark.parametrize("type", ["", "a b", "a b\n", "hotels.*", "a..b", "t" * 201])
def test_a_command_type_is_one_every_transport_can_route(type: str) -> None:
    with pytest.raises(ConfigurationError, match="command type"):
        command(type)


def test_a_compensation_given_as_a_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="the compensation of step 'r'"):
        Saga("x").step("r", command("t.r"), compensate="t.u")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"timer_interval": 0}, "timer_interval must be a positive"),
        ({"timer_batch": 0}, "timer_batch must be an int of at least 1, not 0"),
        ({"concurrency": 0}, "concurrency must be an int of at least 1, not 0"),
    ],
)
def test_orchestrator_options_are_checked(
    sqlite_url: str, options: dict[str, Any], fault: str
) -> None:
    transport = SqlTransport(sqlite_url, channel="defs")
    saga = Saga("x").step("r", command("t.r"))
    with pytest.raises(ConfigurationError, match=fault):
        Orchestrator(Database(sqlite_url), transport, [saga], **options)
    with pytest.raises(ConfigurationError, match="was given no sagas"):
        Orchestrator(Database(sqlite_url), transport, [])


async def test_a_start_refuses_ids_and_data_the_saga_cannot_keep(database: Database) -> None:
    saga = Saga("trip").step("r", command("t.r"))
    orchestrator = Orchestrator(database, SqlTransport(database.url, channel="defs"), [saga])
    for saga_id, fault in [
        ("", "saga_id must be a non-empty string"),
        ("i" * 101, "101 characters long; at most 100"),
        ("a\nb", "control character"),
    ]:
        with pytest.raises(ConfigurationError, match=fault):
            await orchestrator.start("trip", {}, saga_id=saga_id)
    for data, fault in [
        ({"x": object()}, "the data of saga 'trip' is not JSON: Object of type object"),
        ({"x": math.nan}, "the data of saga 'trip' is not JSON: Out of range float"),
        ([1, 2], "must be a dict"),
    ]:
        with pytest.raises(ValueError, match=fault):
            await orchestrator.start("trip", data)  # type: ignore[arg-type]
    async with database.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(sagas)) == 0


async def test_an_id_of_another_sagas_instance_is_refused(database: Database) -> None:
    """Idempotent per id within one saga; across sagas a shared id is a caller's bug."""
    trip = Saga("trip").step("r", command("t.r"))
    local = Saga("note").step("n", _noop).step("r", command("t.r"))
    transport = SqlTransport(database.url, channel="defs")
    orchestrator = Orchestrator(database, transport, [trip, local])
    assert await orchestrator.start("trip", {}, saga_id="s-1") == "s-1"
    assert await orchestrator.start("trip", {"again": True}, saga_id="s-1") == "s-1"
    with pytest.raises(DuplicateError, match="saga id 's-1' is an instance of saga 'trip'"):
        await orchestrator.start("note", {}, saga_id="s-1")
    assert await orchestrator.start("note", {}, saga_id="n-1") == "n-1"
    with pytest.raises(DuplicateError, match="is an instance of saga 'note'"):
        async with database.transaction() as conn:
            await orchestrator.start("trip", {}, saga_id="n-1", conn=conn)
