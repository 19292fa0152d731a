"""Adapter versions on disk: atomic publish, numbering under a race, crash leftovers, pruning, loading."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from nextturn import events
from nextturn.bus import EventLog
from nextturn.events import AdapterPublished, DeploymentChanged
from nextturn.store import Store, upgrade
from trainer.adapters import AdapterShelf, referenced_versions

from support.event_logs import open_log


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    log = open_log("sqlite", str(tmp_path / "events.db"))
    yield log
    log.close()


def announced(log: EventLog) -> list[AdapterPublished]:
    reader = log.consumer(None, [events.ADAPTERS], start="beginning")
    found = [item.event for item in reader.poll(timeout_s=0.5) if isinstance(item.event, AdapterPublished)]
    reader.close()
    return found


def lora_writer(model_dir: Path, seed: int):  # type: ignore[no-untyped-def]
    def write(directory: Path) -> None:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(directory)
    return write


def test_published_versions_are_numbered_peft_directories_with_meta(
        tiny_model: Path, tmp_path: Path, log: EventLog) -> None:
    shelf = AdapterShelf(tmp_path / "adapters")
    first = shelf.publish(lora_writer(tiny_model, 1), base_model=str(tiny_model), parent_version=None,
                          meta={"counts": {"samples": 16}}, event_log=log)
    second = shelf.publish(lora_writer(tiny_model, 2), base_model=str(tiny_model), parent_version=first.version,
                           meta={"counts": {"samples": 32}}, event_log=log)
    assert (first.version, second.version) == (1, 2)
    assert shelf.versions() == [1, 2]
    assert Path(second.path) == (tmp_path / "adapters" / "default" / "000002").resolve()
    assert {p.name for p in Path(second.path).iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                              "meta.json"}
    meta = shelf.meta(2)
    assert meta["parent_version"] == 1 and meta["counts"] == {"samples": 32} and meta["base_model"] == str(tiny_model)
    assert [(e.version, e.parent_version) for e in announced(log)] == [(1, None), (2, 1)]
    # What the engines load: peft reads it back onto the base model, and it changes the outputs.
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, second.path).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, tuned)


def test_a_failed_write_leaves_no_version_and_a_crash_leftover_is_cleared(tmp_path: Path, log: EventLog) -> None:
    shelf = AdapterShelf(tmp_path / "adapters")

    def broken(directory: Path) -> None:
        (directory / "adapter_config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        shelf.publish(broken, base_model="m", parent_version=None, meta={}, event_log=log)
    assert shelf.versions() == [] and list(shelf.dir.iterdir()) == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = shelf.dir / f".tmp-{socket.gethostname()}-{gone.stdout.strip()}-1f2e"  # a trainer killed mid-write
    elsewhere = shelf.dir / ".tmp-otherhost-12-3a4b"  # another host's: not ours to judge
    leftover.mkdir()
    elsewhere.mkdir()
    shelf.publish(lambda d: (d / "adapter_config.json").write_text("{}"), base_model="m", parent_version=None,
                  meta={}, event_log=log)
    assert shelf.versions() == [1] and not leftover.exists() and elsewhere.exists()


def test_two_trainers_racing_for_a_number_both_publish(tmp_path: Path, log: EventLog) -> None:
    shelf = AdapterShelf(tmp_path / "adapters")
    rival = AdapterShelf(tmp_path / "adapters")

    def write_while_the_rival_publishes(directory: Path) -> None:
        (directory / "adapter_config.json").write_text('{"mine": true}')
        rival.publish(lambda d: (d / "adapter_config.json").write_text("{}"), base_model="m",
                      parent_version=None, meta={}, event_log=log)

    mine = shelf.publish(write_while_the_rival_publishes, base_model="m", parent_version=None, meta={}, event_log=log)
    assert mine.version == 2 and shelf.versions() == [1, 2]
    assert (shelf.path(2) / "adapter_config.json").read_text() == '{"mine": true}'
    assert sorted({e.version for e in announced(log)}) == [1, 2]


def test_a_version_renamed_but_not_announced_is_announced_by_the_next_publish(tmp_path: Path, log: EventLog) -> None:
    shelf = AdapterShelf(tmp_path / "adapters")
    shelf.publish(lambda d: (d / "adapter_config.json").write_text("{}"), base_model="m", parent_version=None,
                  meta={}, event_log=log)
    (shelf.dir / ".announced").write_text("0")  # as if the trainer died between the rename and the event
    shelf.publish(lambda d: (d / "adapter_config.json").write_text("{}"), base_model="m", parent_version=1,
                  meta={}, event_log=log)
    events_seen = announced(log)
    assert sorted({e.version for e in events_seen}) == [1, 2]
    assert len({e.event_id for e in events_seen if e.version == 1}) == 1  # the same event, twice: idempotent


def test_pruning_keeps_the_newest_and_every_deployed_version(tmp_path: Path, log: EventLog) -> None:
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    store = Store(url)
    store.apply([DeploymentChanged(stable_version=1, canary_version=3, canary_weight=0.1, reason="test",
                                   actor="controller")])
    shelf = AdapterShelf(tmp_path / "adapters")
    for _ in range(6):
        shelf.publish(lambda d: (d / "adapter_config.json").write_text("{}"), base_model="m",
                      parent_version=shelf.latest(), meta={}, event_log=log)
    assert referenced_versions(store) == {1, 3}
    assert shelf.prune(keep=2, referenced=referenced_versions(store)) == [2, 4]
    assert shelf.versions() == [1, 3, 5, 6]
    store.close()
