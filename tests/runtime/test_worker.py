"""The Worker supervisor, settings and app loading, in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from accord.errors import ConfigurationError
from accord.runtime import Settings, Worker, load_app, load_settings, make_components
from accord.testing import wait_for


class Flaky:
    """Crashes on its first ``crashes`` runs, then runs until stopped."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.stopped = asyncio.Event()
        self.finished_in_flight = False

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"crash {self.runs}")
        await self.stopped.wait()
        await asyncio.sleep(0.05)  # work in flight when stop() was called
        self.finished_in_flight = True

    async def stop(self) -> None:
        self.stopped.set()


async def test_a_crashing_component_is_restarted_and_all_stop_on_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky, steady = Flaky(crashes=2), Flaky(crashes=0)
    worker = Worker([flaky, steady], restart_base=0.01)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await wait_for(lambda: flaky.runs == 3)
    await worker.stop()
    assert await asyncio.wait_for(running, 10) == 0
    assert flaky.finished_in_flight and steady.finished_in_flight
    assert worker.restarts == {0: 2}
    assert "Flaky crashed" in caplog.text and "crash 2" in caplog.text


async def test_a_component_that_ignores_stop_is_cancelled_after_the_timeout() -> None:
    class Stubborn:
        cancelled = False
        started = False

        async def run(self) -> None:
            self.started = True
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        async def stop(self) -> None:
            pass

    stubborn = Stubborn()
    worker = Worker([stubborn], stop_timeout=0.1)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await wait_for(lambda: stubborn.started)
    await worker.stop()
    assert await asyncio.wait_for(running, 10) == 0
    assert stubborn.cancelled


def test_settings_come_from_overrides_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "worker.toml"
    toml.write_text(
        '[accord]\nservice = "from-file"\nchannel = "file-channel"\nlog_level = "DEBUG"\n'
    )
    monkeypatch.setenv("ACCORD_CHANNEL", "env-channel")
    monkeypatch.setenv("ACCORD_DB", "sqlite:///env.db")
    settings = load_settings(toml, db="sqlite:///explicit.db", broker=None)
    assert settings.service == "from-file"
    assert settings.channel == "env-channel"
    assert settings.db == "sqlite:///explicit.db"
    assert settings.log_level == "DEBUG"
    assert settings.broker_url == "sqlite:///explicit.db"

    dotenv = tmp_path / "worker.env"
    dotenv.write_text("# comment\nACCORD_SERVICE=dotenv\nmax_attempts=9\n")
    assert load_settings(dotenv).max_attempts == 9
    monkeypatch.setenv("ACCORD_MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigurationError, match="max_attempts"):
        load_settings()
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_settings_choose_rabbitmqs_queue_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from accord.transports.rabbitmq import RabbitTransport

    broker = "amqp://guest:guest@127.0.0.1:5672/"
    default = load_settings(broker=broker).transport()
    assert isinstance(default, RabbitTransport) and default.queue_type == "classic"
    monkeypatch.setenv("ACCORD_RABBITMQ_QUEUE_TYPE", "quorum")
    quorum = load_settings(broker=broker).transport()
    assert isinstance(quorum, RabbitTransport) and quorum.queue_type == "quorum"
    assert load_settings().transport().name == "sql"  # no such option there: ignored
    monkeypatch.setenv("ACCORD_RABBITMQ_QUEUE_TYPE", "stream")
    with pytest.raises(ConfigurationError, match="rabbitmq_queue_type"):
        load_settings(broker=broker)


async def test_app_factories_may_be_sync_or_async_and_take_settings_or_not() -> None:
    flaky = Flaky(0)

    async def with_settings(settings: Settings) -> list[Flaky]:
        assert isinstance(settings, Settings)
        return [flaky]

    assert await make_components(with_settings, Settings()) == [flaky]
    assert await make_components(lambda: flaky, Settings()) == [flaky]
    with pytest.raises(ConfigurationError, match="no components"):
        await make_components(lambda: [], Settings())
    assert callable(load_app("tests.runtime.apps:effect_consumer"))
