"""Package boundaries: the gateway and signals never load torch, and no stage imports another."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

STAGES = ("gateway", "signals", "trainer")
HEAVY = ("torch", "transformers", "peft", "trl")

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    if not module.name.endswith(".__main__"):  # importing it would run the CLI
        importlib.import_module(module.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_by(package: str) -> set[str]:
    """Top-level modules loaded by importing ``package`` and all its submodules in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("package", ["nextturn", "gateway", "signals"])
def test_the_spine_gateway_and_signals_do_not_load_torch(package: str) -> None:
    assert loaded_by(package) & set(HEAVY) == set()


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage: str) -> None:
    assert loaded_by(stage) & (set(STAGES) - {stage}) == set()


def test_the_probe_can_see_torch() -> None:
    """Torch is installed here, so the checks above are not passing only because it is missing."""
    result = subprocess.run([sys.executable, "-c", "import torch, sys; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
