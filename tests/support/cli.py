"""The ``nextturn`` command as a user runs it: a separate process, with settings from the environment only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def nextturn(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    return subprocess.run(
        [sys.executable, "-m", "nextturn", *args],
        capture_output=True, text=True, timeout=120,
        env={**clean, "NEXTTURN_DATA_DIR": str(data_dir), **env},
    )


def read_status(stage: str, data_dir: Path) -> dict[str, Any]:
    """``nextturn <stage> status --json``, read back."""
    result = nextturn(stage, "status", "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
