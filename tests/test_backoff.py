"""The retry delay shared by the relay, the inbox consumer and saga retries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from accord._backoff import backoff_delay


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=3600),
)
def test_delay_is_jittered_within_the_upper_half_of_the_capped_exponential(
    attempt: int, base: float, cap: float
) -> None:
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    assert ceiling / 2 <= backoff_delay(attempt, base, cap) <= ceiling


def test_an_attempt_past_a_floats_doublings_waits_the_cap() -> None:
    """2.0 ** 1024 overflowed: a message past its 1,024th failed attempt failed the
    relay's round, the consumer's retry or the saga step's backoff instead."""
    for attempt in (1025, 10**6):
        assert 30.0 <= backoff_delay(attempt, 1.0, 60.0) <= 60.0


def test_delay_doubles_per_attempt_until_the_cap() -> None:
    assert 0.5 <= backoff_delay(1, 1.0, 60.0) <= 1.0
    assert 4.0 <= backoff_delay(4, 1.0, 60.0) <= 8.0
    assert 30.0 <= backoff_delay(30, 1.0, 60.0) <= 60.0
