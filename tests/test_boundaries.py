"""Package boundaries: the gateway, signals and rollout never load torch, and no stage imports another."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = ("gateway", "signals", "trainer", "rollout")
HEAVY = ("torch", "transformers", "peft", "trl")
# The gateway modules whose job is to run a model in process (the embedded engine and its LoRA bank): the
# app imports them only when the embedded engine is configured (checked below by building an app for
# another engine).
EMBEDDED = "gateway.engines.embedded,gateway.engines.lora_bank"

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    if not module.name.endswith(".__main__") and module.name not in sys.argv[2].split(","):  # __main__: the CLI
        importlib.import_module(module.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

APP = """
import json, sys
from gateway.app import create_app
from nextturn.settings import Settings
create_app(Settings(engine="openai", upstream_url="http://127.0.0.1:9/v1", model="m", data_dir=sys.argv[1]))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@functools.cache
def loaded_by(package: str, skip: str = EMBEDDED) -> frozenset[str]:
    """Top-level modules loaded by importing ``package`` and its submodules in a fresh interpreter (once per
    run: several checks read the same probe)."""
    result = subprocess.run([sys.executable, "-c", PROBE, package, skip], capture_output=True, text=True, check=True)
    return frozenset(json.loads(result.stdout))


@pytest.mark.parametrize("package", ["nextturn", "gateway", "signals", "rollout"])
def test_the_spine_gateway_signals_and_rollout_do_not_load_torch(package: str) -> None:
    assert loaded_by(package) & set(HEAVY) == set()


def test_a_gateway_in_front_of_an_upstream_does_not_load_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", APP, str(tmp_path)], capture_output=True, text=True, check=True)
    assert set(json.loads(result.stdout)) & set(HEAVY) == set()


def test_the_embedded_engine_is_what_loads_torch() -> None:
    """The skip above hides only the modules that need torch. This also shows that the
    probe sees torch when it is loaded, so the checks above do not pass only because it is missing."""
    assert {"torch", "transformers"} <= loaded_by("gateway", skip="")


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage: str) -> None:
    assert loaded_by(stage) & (set(STAGES) - {stage}) == set()

