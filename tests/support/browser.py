"""Headless Chromium (Debian's chromium and chromium-driver packages, installed by `make test`) driven by
Selenium, for the tests of the gateway's pages, and where their screenshots go."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parents[2]
# Flags that keep Chromium off the network it has no business on (this machine's is closed: without them it
# retries Google's hosts at every start) and fit a container (root: no sandbox; a small /dev/shm).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=1280,1800")


def artifacts() -> Path:
    """Where tests leave what a person may want to look at (screenshots): NEXTTURN_TEST_ARTIFACTS, or
    .test-artifacts/ in the checkout."""
    where = Path(os.environ.get("NEXTTURN_TEST_ARTIFACTS", ROOT / ".test-artifacts"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def _found(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"none of {', '.join(names)} is installed: `make test` installs Debian's chromium and "
                       "chromium-driver")


@contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = _found("chromium", "chromium-browser")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=_found("chromedriver")))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
