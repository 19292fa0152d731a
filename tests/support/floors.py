"""The lowest releases of the ML libraries that pyproject.toml admits, for ``make test-lowest``.

``python tests/support/floors.py --constraints`` prints them as pip constraints (``torch==2.4``);
``python tests/support/floors.py torch`` prints one floor. Runs on the system Python: the standard library only.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

LIBRARIES = ("torch", "transformers", "peft", "trl")


def floors(pyproject: Path) -> dict[str, str]:
    """Each library's ``>=`` bound in the ``ml`` extra.

    >>> floors(Path(__file__).parents[2] / "pyproject.toml").keys() == set(LIBRARIES)
    True
    """
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["ml"]
    bounds = {}
    for requirement in extra:
        found = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*>=\s*([^,;\s]+)", requirement)
        if found and found[1] in LIBRARIES:
            bounds[found[1]] = found[3]
    return bounds


if __name__ == "__main__":
    bounds = floors(Path(__file__).parents[2] / "pyproject.toml")
    if sys.argv[1:] == ["--constraints"]:
        print("\n".join(f"{name}=={version}" for name, version in bounds.items()))
    else:
        print(bounds[sys.argv[1]])
