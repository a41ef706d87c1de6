"""Structured logs carry the message context; spans continue the message's trace."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from accord.messages import Message
from accord.observability import (
    JsonFormatter,
    current_log_context,
    current_traceparent,
    log_context,
)
from accord.observability._tracing import consumer_span


def test_json_logs_carry_the_log_context_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter({"service": "scores"}))
    logger = logging.getLogger("tests.observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with log_context(message_id="m-1", correlation_id="c-1", ignored=None):
            with log_context(consumer="score-engine"):
                logger.info("handling %s", "it", extra={"attempt": 2})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "handling it" and first["level"] == "INFO"
    assert (first["service"], first["consumer"], first["attempt"]) == ("scores", "score-engine", 2)
    assert (first["message_id"], first["correlation_id"]) == ("m-1", "c-1")
    assert "ignored" not in first
    assert "ValueError: boom" in second["exception"] and "consumer" not in second
    assert "message_id" not in third


async def test_log_context_is_per_task() -> None:
    seen: dict[str, str] = {}

    async def handle(message_id: str) -> None:
        with log_context(message_id=message_id):
            await asyncio.sleep(0.01)
            seen[message_id] = current_log_context()["message_id"]

    await asyncio.gather(handle("a"), handle("b"))
    assert seen == {"a": "a", "b": "b"}


def test_the_handler_span_continues_the_messages_trace() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with consumer_span("c", Message(type="t", source="s", traceparent=parent)):
        assert current_traceparent() is not None
        assert current_traceparent().split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"  # type: ignore[union-attr]
    assert current_traceparent() is None
