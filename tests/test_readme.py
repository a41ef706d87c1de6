"""The README's Python examples run, unchanged, as part of the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
ACCORD = Path(sys.executable).with_name("accord")


def test_the_readme_has_python_examples() -> None:
    assert BLOCKS, "the README lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"README example {index} failed:\n{result.stderr[-3000:]}"


def test_readme_worker_app_is_what_accord_worker_runs(tmp_path: Path) -> None:
    """The `--app` example of *Operating it*, as `myservice/app.py`, is taken by
    `accord worker --declare-only` with the database and broker from the environment."""
    [app] = [block for block in BLOCKS if block.startswith("# myservice/app.py")]
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "app.py").write_text(app)
    env = {
        **os.environ,
        "ACCORD_DB": f"sqlite+aiosqlite:///{tmp_path / 'service.db'}",
        "ACCORD_BROKER": f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}",
    }
    result = subprocess.run(
        [str(ACCORD), "worker", "--app", "myservice.app:components", "--declare-only", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [
        {"transport": "sql", "group": "score-engine", "topics": ["match.recorded"]}
    ]
