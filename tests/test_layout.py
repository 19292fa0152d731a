"""The README, docs/ and the image describe the tree as it is: layout, settings, links and packages."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from nextturn.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _layout_block() -> list[str]:
    """The names in the README's Layout section: the first word of each entry line of its code block."""
    section = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    block = section.split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines()[1:] if line.strip() and not line.startswith(" ")]


def _tracked_top_level() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tops = {path.split("/")[0] + ("/" if "/" in path else "") for path in listed.splitlines()}
    return {top for top in tops if not top.startswith(".") and top not in ("README.md", "LICENSE")}


def test_the_readme_layout_lists_exactly_the_top_of_the_tree() -> None:
    listed = _layout_block()
    tracked = _tracked_top_level()
    globbed = {name for name in listed if "*" in name}
    named = set(listed) - globbed
    covered = named | {top for top in tracked for pattern in globbed if Path(top).match(pattern)}
    assert covered == tracked, f"README Layout lacks {sorted(tracked - covered)}, names {sorted(covered - tracked)}"


def test_every_module_of_the_stages_is_on_the_architecture_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(module.relative_to(ROOT)) for package in ("gateway", "signals", "trainer", "rollout", "demo")
               for module in sorted((ROOT / package).rglob("*.py"))
               if module.name != "__init__.py" and f"`{module.name}`" not in page]
    assert missing == []


def test_every_setting_is_documented() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"`NEXTTURN_{name.upper()}`" not in page]
    assert missing == []


def test_every_link_in_the_readme_and_docs_leads_to_a_file() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


def test_the_image_holds_every_package_the_stages_run() -> None:
    """The Dockerfile copies packages one by one: a new stage left out of it would fail only in production."""
    import tomllib

    included = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in included["include"]} - {"demo"}  # the demo is not served
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert copied == packages


def test_every_test_the_reliability_page_names_exists() -> None:
    """A promise whose test was renamed or removed would read as checked while nothing checks it."""
    page = (ROOT / "docs" / "reliability.md").read_text()
    named, path = [], ""
    for given, test in re.findall(r"`(tests/[\w/]+\.py|…)(?:::(\w+))?`", page):
        path = path if given == "…" else given  # "…::name": a test of the file named just before
        named.append((path, test))
    assert len(named) >= 20
    missing = [f"{path}::{test}" for path, test in named
               if not (ROOT / path).exists() or (test and f"def {test}(" not in (ROOT / path).read_text())]
    assert missing == []
