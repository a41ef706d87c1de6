"""The idempotent consumer: handlers, the inbox row in the handler's transaction,
retries with backoff, and dead letters for what cannot be handled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, Literal

from pydantic import ValidationError

from accord._aio import wait_event
from accord._backoff import backoff_delay
from accord._checks import is_count, is_seconds
from accord._retention import Pruning
from accord.db import Database
from accord.db.database import log_retried_failure, unreachable
from accord.errors import ConfigurationError
from accord.inbox._context import (
    BatchFunc,
    HandlerContext,
    HandlerFunc,
    Registration,
    describe_validation_error,
    run_after_commit,
)
from accord.inbox._dead_letters import (
    ReplayDelivery,
    claim_replays,
    release_replays,
    write_dead_letter,
)
from accord.inbox._store import (
    PRUNE_BATCH,
    forget_holds,
    forget_starts,
    holds_of,
    note_holds,
    note_start,
    prune_batch,
    record,
    record_many,
)
from accord.messages import CONTROL_CHARACTERS, MAX_NAME_LENGTH, Message
from accord.observability import log_context
from accord.observability._metrics import (
    CONSUMER_DEAD_LETTERED,
    CONSUMER_DUPLICATES,
    CONSUMER_FAILED,
    CONSUMER_HANDLE_SECONDS,
    CONSUMER_HANDLED,
)
from accord.observability._tracing import batch_spans, consumer_span
from accord.transports.base import (
    Delivery,
    GroupDeclaration,
    Subscription,
    Transport,
    topic_matches,
)

__all__ = ["Consumer"]

log = logging.getLogger("accord.inbox")

_TRACEBACK_FRAMES = 6
_REASON_LIMIT = 4000
# How much of an error's own text a reason or a log line keeps: the rest of the reason
# is for the traceback, which says where it failed.
_ERROR_TEXT_LIMIT = 1000
# A message held back behind its key's failed predecessor comes back this long after it.
_HELD_BACK_GAP = 0.05

#: A delivery that passed the checks: (delivery, message, registration, parsed data).
_Ready = tuple[Delivery, Message, Registration, Any]


def _describe(exc: BaseException) -> str:
    """``Type: text`` of an error for a reason or a log line, whatever its ``__str__``
    does: raise (the message must still be dead-lettered) or return a megabyte."""
    try:
        text = str(exc)
    except Exception as error:
        text = f"<its str() raised {type(error).__name__}>"
    if len(text) > _ERROR_TEXT_LIMIT:
        text = text[: _ERROR_TEXT_LIMIT - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_reason(exc: BaseException, attempts: int) -> str:
    exc = _Aborted.original(exc)
    head = f"handler failed {attempts} time(s); last error: {_describe(exc)}"
    frames = "".join(traceback.format_exception(exc, limit=-_TRACEBACK_FRAMES)).rstrip()
    reason = f"{head}\n{frames}"
    return reason if len(reason) <= _REASON_LIMIT else reason[: _REASON_LIMIT - 3] + "..."


class _Aborted(Exception):
    """A handler's failure that is no :class:`Exception` (a ``BaseException`` of its
    own, a ``CancelledError`` of something it awaited), carried as one so that it is
    retried and dead-lettered like any failure instead of ending the consumer."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(_describe(error))
        self.error = error

    @staticmethod
    def original(exc: BaseException) -> BaseException:
        """What the handler raised."""
        return exc.error if isinstance(exc, _Aborted) else exc


@contextlib.contextmanager
def _handler_failures() -> Iterator[None]:
    """Around a handler's call: what it raises is a failure of its message, unless the
    process or this task is being stopped (``KeyboardInterrupt``, ``SystemExit``, a
    cancellation of this task): those go on, and the message comes again."""
    try:
        yield
    except (Exception, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # this task is cancelled: a stop, not the message's fault
        raise _Aborted(exc) from exc
    except BaseException as exc:
        raise _Aborted(exc) from exc


#: How many messages a consumer remembers the outage retries of (see _attempts).
_OUTAGE_RETRIES_KEPT = 10_000


class Consumer:
    """Consumes one consumer group from a transport and applies each message exactly once.

    For every delivery the consumer, in one transaction on ``database``, inserts
    the inbox row ``(name, message id)`` and runs the handler registered for the
    message type; both commit together. A message whose id is already in the
    inbox is acknowledged without running the handler.

    * A handler that raises — anything but ``KeyboardInterrupt``, ``SystemExit`` or
      the cancellation of the consumer's own task, so also a ``BaseException`` of its
      own — rolls everything back; the delivery is nacked with
      exponential backoff and jitter (``backoff_base`` doubling per attempt, at
      most ``backoff_cap`` seconds). At attempt ``max_attempts`` the message is
      written to ``accord_dead_letters`` with the error, then acknowledged.
    * Bad input — undecodable bytes, a non-CloudEvent, a type with no handler,
      data failing the handler's ``schema`` — is dead-lettered at once with a
      reason saying what was wrong; the consumer carries on.
    * Nothing is dropped silently: if even the dead letter cannot be written the
      delivery is nacked and comes back.
    * A message whose handler was started ``max_deliveries`` times (by default 20,
      or twice ``max_attempts`` if that is more) without finishing is dead-lettered
      before the next start: one whose handler kills or hangs the process is never
      settled, so it would otherwise come back for ever. Starts of redelivered
      messages are counted in ``accord_inbox_starts`` (committed before the handler
      runs; a first delivery writes nothing), and redelivered messages are handled
      one at a time, so that only the message that kills the process is counted,
      not those prefetched or batched with it. ``None`` turns the limit off.
    * Dead letters marked for replay (:class:`~accord.inbox.DeadLetters`) are
      picked up from ``database`` every ``replay_interval`` seconds and handled
      again through the same path.
    * Inbox rows older than ``inbox_retention`` (a week by default) are deleted
      while it runs, a batch at a time every ten minutes: a message delivered again
      after that is applied again, so keep it well above the longest redelivery
      window of the broker. ``None`` keeps every row (prune with ``accord inbox
      prune`` then).
    * ``batch_size`` > 1 handles what has arrived, up to that many deliveries, in
      one transaction: one multi-row inbox insert, the handlers in arrival order,
      one commit — far fewer round trips per message under load. Consecutive
      messages whose handlers were registered with the same ``batch`` function go
      to it in one call, so it can read and write set-wise. If anything in a batch
      fails, the batch rolls back and its messages are handled one at a time as
      above (a later message with the key of one that failed is given back after
      it, and that redelivery, not being a failure, does not count against its
      ``max_attempts``), so a poison message is retried and dead-lettered on its own. The
      prefetch is raised to at least twice ``batch_size`` so that the next batch
      arrives while one is handled.

    Use it as a worker component: :meth:`run` until :meth:`stop`.
    """

    def __init__(
        self,
        name: str,
        database: Database,
        transport: Transport,
        *,
        max_attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        prefetch: int = 64,
        replay_interval: float = 1.0,
        replay_lease: float = 60.0,
        batch_size: int = 1,
        max_deliveries: int | Literal["auto"] | None = "auto",
        inbox_retention: timedelta | None = timedelta(days=7),
    ) -> None:
        _check_options(
            max_attempts=max_attempts,
            batch_size=batch_size,
            prefetch=prefetch,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            replay_interval=replay_interval,
            replay_lease=replay_lease,
            inbox_retention=inbox_retention,
        )
        if max_deliveries == "auto":
            max_deliveries = max(20, 2 * max_attempts)
        if max_deliveries is not None and not is_count(max_deliveries):
            raise ConfigurationError(
                f"max_deliveries must be a whole number, 'auto' or None, got {max_deliveries!r}"
            )
        if max_deliveries is not None and max_deliveries <= max_attempts:
            raise ConfigurationError(
                f"max_deliveries ({max_deliveries}) must be more than max_attempts "
                f"({max_attempts}): a failing handler is dead-lettered at max_attempts; "
                "the delivery limit is for messages that never get that far"
            )
        self.name = name
        self.database = database
        self.transport = transport
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.replay_interval = replay_interval
        self.replay_lease = replay_lease
        self.batch_size = batch_size
        self.max_deliveries = max_deliveries
        # By message id: its deliveries that failed because the database was away,
        # left out of its attempts (they cannot be written down as holds then). In
        # memory, the latest _OUTAGE_RETRIES_KEPT messages: after a restart they count.
        self._outage_retries: dict[str, int] = {}
        self._prunings = [
            Pruning(
                f"inbox rows of {name}",
                inbox_retention,
                lambda cutoff, limit: prune_batch(database, name, cutoff, limit),
                PRUNE_BATCH,
            )
        ]
        # The next batch should be waiting while one is handled: its deliveries are
        # only settled after it, so a window of one batch would run dry each time.
        self.prefetch = max(prefetch, 2 * batch_size) if batch_size > 1 else prefetch
        self._exact: dict[str, Registration] = {}
        self._patterns: list[Registration] = []
        self._subscription: Subscription | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()
        self._replay_stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- registration -------------------------------------------------------------

    def add_pruning(self, pruning: Pruning) -> None:
        """Run ``pruning`` from this consumer's loop too, as its inbox's: rows its
        handlers keep for a while (a saga participant's records of its steps)."""
        self._prunings.append(pruning)

    def handler(self, type: str, *, schema: Any = None) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator registering ``async def f(ctx, data)`` for messages of ``type``.

        ``type`` is an exact message type, or an AMQP-style pattern (``match.*``,
        ``match.#``) used when no exact registration matches. ``schema`` (a
        pydantic model, a dataclass, or any type pydantic can validate) turns the
        message data into the handler's ``data``; without it ``data`` is the raw
        JSON value.
        """

        def register(func: HandlerFunc) -> HandlerFunc:
            self.add_handler(type, func, schema=schema)
            return func

        return register

    def add_handler(
        self, type: str, func: HandlerFunc, *, schema: Any = None, batch: BatchFunc | None = None
    ) -> None:
        """Register ``func`` for ``type`` (see :meth:`handler`).

        ``batch``, optional, handles many messages at once in batch mode (see the
        class doc): ``await batch([(ctx, data), ...])`` with every message of a run
        of consecutive messages whose registrations share that function. It must
        have the same effect as calling ``func`` on each in turn.

        Handlers are registered before :meth:`start`: the group is subscribed for the
        types handled then, so one added while it runs would get nothing (refused).
        """
        if self._subscription is not None:
            raise ConfigurationError(
                f"consumer {self.name!r} is running: register the handler for {type!r} "
                f"before start() (its group is subscribed for {', '.join(self.topics)} only, "
                "so it would never be called); or stop(), register, start() again"
            )
        if not isinstance(type, str) or not type or len(type) > MAX_NAME_LENGTH:
            long = isinstance(type, str) and len(type) > MAX_NAME_LENGTH
            shown = f"{type[:40]!r}… ({len(type)} characters)" if long else repr(type)
            raise ConfigurationError(
                f"consumer {self.name!r}: {shown} is no message type: a type is a non-empty "
                f"string of at most {MAX_NAME_LENGTH} characters"
            )
        if CONTROL_CHARACTERS.search(type):
            raise ConfigurationError(
                f"consumer {self.name!r}: {type!r} is no message type: it holds a control "
                "character, which no message type may"
            )
        registration = Registration(type, func, schema, batch)
        if registration.is_pattern:
            if any(r.pattern == type for r in self._patterns):
                raise ConfigurationError(f"consumer {self.name!r} already handles {type!r}")
            self._patterns.append(registration)
        else:
            if type in self._exact:
                raise ConfigurationError(f"consumer {self.name!r} already handles {type!r}")
            self._exact[type] = registration

    @property
    def topics(self) -> list[str]:
        """The topic patterns the consumer subscribes to: one per registration."""
        return [*self._exact, *(r.pattern for r in self._patterns)]

    def _lookup(self, message_type: str) -> Registration | None:
        found = self._exact.get(message_type)
        if found is None:
            found = next(
                (r for r in self._patterns if topic_matches(r.pattern, message_type)), None
            )
        return found

    # -- lifecycle ----------------------------------------------------------------

    def _check_handlers(self) -> None:
        if not self.topics:
            raise ConfigurationError(
                f"consumer {self.name!r} has no handlers: register one with "
                "@consumer.handler('message.type') before starting it"
            )

    async def declare(self) -> list[GroupDeclaration]:
        """Declare group ``name`` on the transport for the handled types, without
        consuming: what is published from now on waits for the group. A worker
        calls this before it starts any component (see :class:`~accord.runtime.Worker`)."""
        self._check_handlers()
        await self.transport.connect()
        await self.transport.declare(self.name, topics=self.topics)
        return [GroupDeclaration(self.transport.name, self.name, tuple(self.topics))]

    async def start(self) -> None:
        """Connect the transport and subscribe as group ``name``; idempotent."""
        async with self._lock:
            if self._subscription is not None:
                return
            self._check_handlers()
            await self.transport.connect()
            self._subscription = await self.transport.subscribe_batches(
                self.name,
                self.handle_batch,
                topics=self.topics,
                prefetch=self.prefetch,
                max_batch=self.batch_size,
            )
            # Its own stop signal: _stop_event may still be set by an earlier stop().
            self._replay_stopping = asyncio.Event()
            self._replay_task = asyncio.create_task(
                self._replay_loop(self._replay_stopping), name=f"accord-replay-{self.name}"
            )
            log.info(
                "consumer %s started on %s for %s", self.name, self.transport.name, self.topics
            )

    async def stop(self) -> None:
        """Stop consuming. Idempotent. A handler in progress finishes first on RabbitMQ
        (up to the transport's ``stop_timeout``); the SQL transport, NATS and Redis
        cancel it, so its transaction rolls back and its messages come again. Nothing
        is lost either way."""
        self._stop_event.set()
        async with self._lock:
            # Under the lock: the replay loop of a start() that was under way is this one.
            self._replay_stopping.set()
            subscription, self._subscription = self._subscription, None
            replay_task, self._replay_task = self._replay_task, None
            if subscription is not None:
                await subscription.stop()
            if replay_task is not None:
                await replay_task
            if subscription is not None:
                log.info("consumer %s stopped", self.name)

    async def run(self) -> None:
        """Start, then consume until :meth:`stop` is called (a worker component)."""
        try:
            await self.start()
            await self._stop_event.wait()
        finally:
            await self.stop()
            # Reset here, not at the start: a stop() that came before run() must hold.
            self._stop_event.clear()

    # -- handling -----------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``: exponential, capped, with
        jitter in the upper half so retries of many messages spread out."""
        return backoff_delay(attempt, self.backoff_base, self.backoff_cap)

    async def handle(self, delivery: Delivery) -> None:
        """Handle one delivery and settle it (the transport's handler callback)."""
        with log_context(**self._fields(delivery)):
            ready = await self._triage(delivery)
            if ready is not None:
                await self._process(*ready)

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Handle deliveries in one transaction (the transport's batch callback; see
        ``batch_size`` in the class doc). Deliveries left unsettled are acked by the
        transport when this returns."""
        if len(deliveries) == 1:
            await self.handle(deliveries[0])
            return
        ready: list[_Ready] = []
        for delivery in deliveries:
            with log_context(**self._fields(delivery)):
                item = await self._triage(delivery)
            if item is not None:
                ready.append(item)
        if not ready:
            return
        if any(self._counts_starts(d) for d, _, _, _ in ready):
            # Redeliveries (after a crash, a restart, a failure): one at a time, each
            # start counted, so that a message that kills the process is the only one
            # whose starts grow, not every message of its batch.
            await self._one_at_a_time(ready)
            return
        started = time.perf_counter()
        try:
            with log_context(consumer=self.name, batch=len(ready)):
                fresh = await self._apply_batch(ready)
        except Exception as exc:
            log.info(
                "batch of %d failed (%s); handling its messages one at a time",
                len(ready),
                _describe(_Aborted.original(exc)),
            )
            await self._one_at_a_time(ready)
            return
        share = (time.perf_counter() - started) / len(ready)
        for _, message, _, _ in ready:
            CONSUMER_HANDLE_SECONDS.labels(self.name, message.type).observe(share)
            if message.id in fresh:
                fresh.discard(message.id)
                CONSUMER_HANDLED.labels(self.name, message.type).inc()
            else:
                CONSUMER_DUPLICATES.labels(self.name, message.type).inc()

    def _fields(self, delivery: Delivery) -> dict[str, Any]:
        message = delivery.message
        if message is None:
            return {"consumer": self.name}
        return {
            "consumer": self.name,
            "message_id": message.id,
            "message_type": message.type,
            "correlation_id": message.correlationid or message.id,
            "causation_id": message.causationid,
        }

    async def _triage(self, delivery: Delivery) -> _Ready | None:
        """The delivery ready to handle, or None once it was dead-lettered as bad input."""
        message = delivery.message
        if message is None:
            error = delivery.decode_error
            await self._dead_letter(delivery, "undecodable", f"undecodable message: {error}")
            return None
        registration = self._lookup(message.type)
        if registration is None:
            await self._dead_letter(
                delivery,
                "unknown_type",
                f"unknown message type {message.type!r}: consumer {self.name!r} has handlers "
                f"for {', '.join(self.topics)}",
            )
            return None
        try:
            data = registration.parse(message.data)
        except ValidationError as exc:
            reason = describe_validation_error(registration.schema, exc)
            await self._dead_letter(delivery, "invalid_data", reason)
            return None
        except Exception as exc:
            # A validator that raises something pydantic does not wrap (AttributeError
            # on data of a type it did not expect): still this message's data, and it
            # would fail the same way on every redelivery.
            schema = getattr(registration.schema, "__name__", repr(registration.schema))
            reason = f"data does not match {schema}: its validation raised {_describe(exc)}"
            await self._dead_letter(delivery, "invalid_data", reason)
            return None
        return delivery, message, registration, data

    def _counts_starts(self, delivery: Delivery) -> bool:
        """Whether the handler starts of this delivery are counted: a redelivery, with a
        limit set. A first delivery, the common case, costs nothing."""
        return (
            self.max_deliveries is not None
            and delivery.attempt > 1
            and not isinstance(delivery, ReplayDelivery)
        )

    async def _start(self, delivery: Delivery, message: Message) -> bool | None:
        """Count this start of a redelivered message's handler (committed before it
        runs, so a start that kills the process still counts): True once counted,
        False if it could not be (no ``accord db upgrade`` yet: handled anyway). If
        the handler already ran ``max_deliveries`` times, dead-letter the message
        instead and return None.

        Starts are counted, not deliveries: a process that dies also gives back what it
        had only prefetched, which the transport counts as delivered once more."""
        limit = self.max_deliveries
        assert limit is not None
        try:
            async with self.database.transaction() as conn:
                # The first delivery's start was not written: this is start starts + 1.
                starts = await note_start(conn, self.name, message.id) + 1
        except Exception:
            log.warning("could not count a start of %s; handling it anyway", message.id)
            return False
        if starts <= limit:
            return True
        await self._dead_letter(
            delivery,
            "delivery_limit",
            f"its handler was started {starts - 1} times and never finished "
            f"(max_deliveries={limit}): it may kill or hang the process; fix that, then "
            "replay it",
            attempts=starts - 1,
        )
        return None

    async def _apply_batch(self, ready: Sequence[_Ready]) -> set[str]:
        """Inbox rows + handlers of ``ready`` in one transaction; the ids applied.

        Each message applied has its own span, ended with the transaction (marked
        failed if it fails): its ``ctx.span``, so that a batch function, which cannot
        have one current span for all, still continues each message's trace."""
        handled: list[HandlerContext] = []
        with batch_spans(self.name, len(ready)) as spans:
            async with self.database.engine.begin() as conn:
                fresh = await record_many(conn, self.name, [m for _, m, _, _ in ready])
                todo: list[_Ready] = []
                for item in ready:
                    if item[1].id in fresh:
                        fresh.discard(item[1].id)  # a second copy in this batch is a duplicate
                        todo.append(item)
                applied = {message.id for _, message, _, _ in todo}
                for run in _runs(todo):
                    batch = run[0][2].batch
                    started = [spans.start(m) for _, m, _, _ in run]
                    if batch is not None:
                        # A batch function has no one current span: each ctx carries its own.
                        contexts = [
                            (HandlerContext(conn, m, self.name, d.attempt, span=span), data)
                            for (d, m, _, data), span in zip(run, started, strict=True)
                        ]
                        handled.extend(ctx for ctx, _ in contexts)
                        with _handler_failures():
                            await batch(contexts)
                        continue
                    for (delivery, message, registration, data), span in zip(
                        run, started, strict=True
                    ):
                        ctx = HandlerContext(conn, message, self.name, delivery.attempt)
                        handled.append(ctx)
                        with (
                            _handler_failures(),
                            log_context(**self._fields(delivery)),
                            spans.current(message, span),
                        ):
                            await registration.func(ctx, data)
        run_after_commit(c for ctx in handled for c in ctx.committed)
        return applied

    async def _one_at_a_time(self, ready: Sequence[_Ready]) -> None:
        # key -> in how many seconds the last message of that key given back (the failed
        # one, then each follower held back behind it) comes back
        retrying: dict[str, float] = {}
        seen: set[str] = set()
        for delivery, message, registration, data in ready:
            with log_context(**self._fields(delivery)):
                if message.id in seen:
                    # A second copy (a relay's duplicate) of a message handled just now:
                    # applied, or given back to come again. Held back instead, its hold
                    # would be counted against the first copy's failed attempts.
                    CONSUMER_DUPLICATES.labels(self.name, message.type).inc()
                    log.info("skipped a second copy of %s %s", message.type, message.id)
                    await delivery.ack()
                    continue
                seen.add(message.id)
                key = message.key
                if key is not None and key in retrying:
                    # Its key's earlier message failed: it must not be overtaken, so
                    # it comes back after that one (and after its own predecessors).
                    # Given back at once: left unsettled, a stop would return it now.
                    retrying[key] += _HELD_BACK_GAP
                    await self._hold(delivery, message.id, retrying[key])
                    continue
                comes_back = await self._process(delivery, message, registration, data)
                if comes_back is not None and key is not None:
                    retrying[key] = comes_back

    async def _hold(self, delivery: Delivery, message_id: str, delay: float) -> None:
        """Give back a delivery held behind a failed message of its key, in ``delay``
        seconds. The hold is noted first, so that the redelivery, which the broker
        counts as one more attempt, does not count against the message's attempts."""
        try:
            async with self.database.transaction() as conn:
                await note_holds(conn, self.name, [message_id])
        except Exception:
            log.warning(
                "could not note the hold of %s; its redelivery counts as an attempt",
                message_id,
                exc_info=True,
            )
        await delivery.nack(delay)

    async def _attempts(self, delivery: Delivery) -> int:
        """How many times the handler has now failed on this message: the delivery's
        attempt, less the redeliveries that were holds (read only when it failed)."""
        message = delivery.message
        if delivery.attempt == 1 or message is None or isinstance(delivery, ReplayDelivery):
            return delivery.attempt  # a replay counts afresh and is never held back
        attempt = delivery.attempt - self._outage_retries.get(message.id, 0)
        try:
            async with self.database.read() as conn:
                holds = await holds_of(conn, self.name, message.id)
        except Exception:
            log.warning("could not read the holds of %s; counting every delivery", message.id)
            return max(1, attempt)
        return max(1, attempt - holds)

    def _note_outage_retry(self, delivery: Delivery) -> None:
        message = delivery.message
        if message is None or isinstance(delivery, ReplayDelivery):
            return
        retries = self._outage_retries
        retries[message.id] = retries.pop(message.id, 0) + 1  # now the latest
        if len(retries) > _OUTAGE_RETRIES_KEPT:
            del retries[next(iter(retries))]

    async def _process(
        self, delivery: Delivery, message: Message, registration: Registration, data: Any
    ) -> float | None:
        """Apply one message and settle its delivery; if it failed and comes back, in
        how many seconds."""
        counted = False
        if self._counts_starts(delivery):
            started_now = await self._start(delivery, message)
            if started_now is None:
                return None  # dead-lettered
            counted = started_now
        started = time.perf_counter()
        try:
            applied = await self._apply(delivery, message, registration, data, counted=counted)
        except Exception as exc:
            CONSUMER_FAILED.labels(self.name, message.type).inc()
            return await self._failed(delivery, exc)
        finally:
            CONSUMER_HANDLE_SECONDS.labels(self.name, message.type).observe(
                time.perf_counter() - started
            )
        if applied:
            CONSUMER_HANDLED.labels(self.name, message.type).inc()
            log.debug("handled %s", message.type)
        else:
            CONSUMER_DUPLICATES.labels(self.name, message.type).inc()
            log.info("skipped duplicate %s %s", message.type, message.id)
        await delivery.ack()
        return None

    async def _apply(
        self,
        delivery: Delivery,
        message: Message,
        registration: Registration,
        data: Any,
        *,
        counted: bool = False,
    ) -> bool:
        """Inbox row + handler in one transaction (with it, the message's counted starts
        go). False if the message was a duplicate."""
        async with self.database.engine.begin() as conn:
            # The inbox row goes first: a concurrent delivery of the same id blocks on
            # it until this transaction ends, then sees a duplicate.
            fresh = await record(conn, self.name, message)
            if counted:
                await forget_starts(conn, self.name, message.id)
            if not fresh:
                return False
            ctx = HandlerContext(conn, message, self.name, delivery.attempt)
            with _handler_failures(), consumer_span(self.name, message):
                await registration.func(ctx, data)
        run_after_commit(ctx.committed)
        return True

    async def _failed(self, delivery: Delivery, exc: Exception) -> float | None:
        """Retry later or dead-letter; if the delivery comes back, in how many seconds."""
        if unreachable(_Aborted.original(exc)):
            # The database went away (a restart, a failover): not the message's fault,
            # so never a reason to dead-letter it. Its attempts still grow (the broker
            # counts deliveries), and a dead letter written the moment the database is
            # back would leave a committed message unapplied until an operator replays it.
            delay = self.backoff(delivery.attempt)
            log.warning(
                "the database is unavailable (%s); retrying in %.2fs",
                _describe(_Aborted.original(exc)),
                delay,
            )
            self._note_outage_retry(delivery)
            await delivery.nack(delay)
            return delay
        attempt = await self._attempts(delivery)
        if attempt >= self.max_attempts:
            log.error(
                "handler failed on attempt %d of %d; dead-lettering",
                attempt,
                self.max_attempts,
                exc_info=_Aborted.original(exc),
            )
            reason = _error_reason(exc, attempt)
            return await self._dead_letter(delivery, "handler_failed", reason, attempt)
        delay = self.backoff(attempt)
        log.warning(
            "handler failed on attempt %d of %d (%s); retrying in %.2fs",
            attempt,
            self.max_attempts,
            _describe(_Aborted.original(exc)),
            delay,
        )
        await delivery.nack(delay)
        return delay

    async def _dead_letter(
        self, delivery: Delivery, kind: str, reason: str, attempts: int | None = None
    ) -> float | None:
        """Dead-letter and ack; if that failed and the delivery comes back, in how many
        seconds. ``attempts``: how many times the handler failed (default: the
        delivery's attempt)."""
        try:
            async with self.database.transaction() as conn:
                await write_dead_letter(
                    conn,
                    consumer=self.name,
                    delivery=delivery,
                    kind=kind,
                    reason=reason,
                    attempts=attempts,
                )
        except Exception as exc:
            # Never drop a message: if its dead letter cannot be written, give it back.
            delay = self.backoff(delivery.attempt)
            log_retried_failure(
                log, exc, "could not write a dead letter; redelivering in %.2fs", delay
            )
            await delivery.nack(delay)
            return delay
        CONSUMER_DEAD_LETTERED.labels(self.name, kind).inc()
        log.error("dead-lettered (%s): %s", kind, reason.splitlines()[0])
        await delivery.ack()
        if delivery.message is not None and delivery.attempt > 1:
            # Housekeeping, after the fact: a database whose schema predates the
            # holds and starts tables (no `accord db upgrade` yet) must still dead-letter.
            for forget in (forget_holds, forget_starts):
                try:
                    async with self.database.transaction() as conn:
                        await forget(conn, self.name, delivery.message.id)
                except Exception:
                    log.debug("could not %s of %s", forget.__name__, delivery.message.id)
        return None

    # -- replay -------------------------------------------------------------------

    async def _replay_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            claimed: Sequence[Any] = ()
            try:
                claimed = await claim_replays(
                    self.database, self.name, limit=20, lease=self.replay_lease
                )
                for index, letter in enumerate(claimed):
                    if stopping.is_set():
                        # Stopping: the letters not begun go back now, not after the lease.
                        await release_replays(self.database, [c.id for c in claimed[index:]])
                        return
                    delivery = ReplayDelivery(self.database, letter)
                    log.info("replaying dead letter %d", letter.id)
                    await self.handle(delivery)
                    await delivery.ack()  # no-op if settled, as with transports
            except Exception as exc:
                log_retried_failure(
                    log, exc, "replaying dead letters of %s failed; will retry", self.name
                )
            more = False  # a prune deleted a full batch: more may be left
            for pruning in self._prunings:
                more |= pruning.full(await pruning.when_due())
            if len(claimed) < 20 and not more:
                await wait_event(stopping, self.replay_interval)


def _check_options(
    *,
    max_attempts: int,
    batch_size: int,
    prefetch: int,
    backoff_base: float,
    backoff_cap: float,
    replay_interval: float,
    replay_lease: float,
    inbox_retention: timedelta | None,
) -> None:
    """Refuse what would misbehave only later, and quietly: a replay interval of 0 polls
    the database without pause, a retention of 0 or less deletes each inbox row as soon
    as it is written (a redelivery is applied again), a retention that is no timedelta
    fails every prune."""
    for name, count in (
        ("max_attempts", max_attempts),
        ("batch_size", batch_size),
        ("prefetch", prefetch),
    ):
        if not isinstance(count, int) or isinstance(count, bool):
            raise ConfigurationError(f"{name} must be a whole number, got {count!r}")
        if not is_count(count):
            raise ConfigurationError(f"{name} must be at least 1, got {count}")
    for name, seconds, least in (
        ("backoff_base", backoff_base, 0.0),
        ("backoff_cap", backoff_cap, 0.0),
        ("replay_interval", replay_interval, None),
        ("replay_lease", replay_lease, None),
    ):
        if not is_seconds(seconds, zero_ok=least is not None):
            more = "0 or more" if least is not None else "more than 0"
            raise ConfigurationError(f"{name} must be a number of seconds, {more}, got {seconds!r}")
    if inbox_retention is not None and (
        not isinstance(inbox_retention, timedelta) or inbox_retention <= timedelta(0)
    ):
        raise ConfigurationError(
            f"inbox_retention must be a positive timedelta or None (keep every row), got "
            f"{inbox_retention!r}: a message delivered again after its row is pruned is "
            "applied again"
        )


def _runs(items: Sequence[_Ready]) -> list[list[_Ready]]:
    """Consecutive items grouped: those sharing a batch function together, others alone."""
    runs: list[list[_Ready]] = []
    for item in items:
        batch = item[2].batch
        if runs and batch is not None and runs[-1][0][2].batch == batch:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
