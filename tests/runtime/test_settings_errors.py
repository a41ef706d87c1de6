"""Settings errors name what is wrong, in one line, from the library and the CLI."""

from __future__ import annotations

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
