"""Settings errors name what is wrong, in one line, from the library and the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from accord.errors import ConfigurationError
from accord.runtime import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_worker_settings_errors_are_reported_without_a_traceback(tmp_path: Path) -> None:
    """``accord worker`` with a settings file that is not there: 'error: ...' and exit
    1, like every other command, not a Python traceback."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from accord.cli import main; main()",
            "worker",
            "--app",
            "tests.runtime.apps:effect_consumer",
            "--settings",
            str(tmp_path / "missing.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "does not exist" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr  # not wrapped, whatever the path
    assert "Traceback" not in stderr, stderr


def test_a_settings_file_that_is_not_valid_toml_is_a_configuration_error(tmp_path: Path) -> None:
    """A settings file that is not TOML: a ConfigurationError naming the file."""
    bad = tmp_path / "worker.toml"
    bad.write_text("[accord]\nservice = score-engine\n")  # unquoted string
    with pytest.raises(ConfigurationError, match=r"worker\.toml"):
        load_settings(bad)


def _worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", "from accord.cli import main; main()", "worker", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--log-level", "LOUD"], "log_level: 'LOUD' is not a logging level: use DEBUG, INFO"),
        (["--settings", "{port}"], "metrics_port: Input should be less than or equal to 65535"),
        (["--settings", "{busy}"], "cannot serve metrics on port {busy_port}: Address already"),
    ],
    ids=["unknown log level", "port out of range", "port in use"],
)
def test_worker_settings_the_worker_only_used_later_are_checked_without_a_traceback(
    tmp_path: Path, sqlite_url: str, option: list[str], said: str
) -> None:
    """A logging level logging does not know, a metrics port no socket can have or one
    in use: these were tracebacks from configure_logging and the metrics server."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        out_of_range = tmp_path / "range.toml"
        out_of_range.write_text("metrics_port = 99999\n")
        busy = tmp_path / "busy.env"
        busy.write_text(f"ACCORD_METRICS_PORT={busy_port}\n")
        names = {"port": out_of_range, "busy": busy, "busy_port": busy_port}
        args = [part.format(**names) for part in option]
        done = _worker("--app", "tests.runtime.apps:effect_consumer", "--db", sqlite_url, *args)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert said.format(**names) in " ".join(stderr.split()), stderr


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("worker.toml", '[accord]\nservcie = "score-engine"\nchannel = "scores"\n'),
        ("worker.toml", 'servcie = "score-engine"\n'),
        ("worker.env", "ACCORD_SERVCIE=score-engine\nACCORD_CHANNEL=scores\n"),
    ],
    ids=["toml table", "toml top level", "KEY=value"],
)
def test_an_unknown_key_in_a_settings_file_is_an_error_naming_it(
    tmp_path: Path, name: str, text: str
) -> None:
    """A misspelt setting was ignored in silence: the worker ran as service 'accord'."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=r"unknown setting\(s\) 'servcie'.*service"):
        load_settings(path)


def test_an_accord_key_that_is_no_table_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('accord = "score-engine"\n')
    with pytest.raises(ConfigurationError, match=r"'accord' must be a table"):
        load_settings(path)


def test_settings_refuse_max_attempts_below_one_and_take_any_case_of_a_level() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        load_settings(max_attempts=0)
    assert load_settings(log_level="warning").log_level == "WARNING"


def test_worker_help_says_what_a_settings_file_holds() -> None:
    """--help said only 'Settings file (.toml or KEY=value)': not which keys, nor that
    the environment's ACCORD_* and the options win over it."""
    from typer.testing import CliRunner

    from accord.cli.app import _register_subcommands, app
    from accord.runtime import Settings

    _register_subcommands()
    shown = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.replace("│", " ").split())
    assert "[accord] table" in text
    for name in Settings.model_fields:
        assert name in text, name
    assert "ACCORD_<KEY>" in text
    assert "DEBUG, INFO, WARNING, ERROR or CRITICAL" in text
