"""Helpers for the browser tests: Debian's Chromium through Playwright, axe-core from npm,
screenshots under test-artifacts/web/, and a provider whose booking link we know."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import RunningServer, bookdav_command, clean_env, write_config
from tests.test_availability import Provider, make_provider

REPO = Path(__file__).resolve().parent.parent
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = REPO / "test-artifacts" / "web"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
WIDTHS = (360, 1280)


def require_browser() -> None:
    """Skip, saying what is missing, where Debian's Chromium or axe-core is not installed (a
    laptop); `.ci/run` installs both and sets BOOKDAV_REQUIRE_BROWSER=1, which fails instead."""
    missing = [
        what
        for what, path in (
            ("Debian's chromium (apt-get install chromium)", Path(CHROMIUM)),
            ("axe-core (npm ci)", AXE),
        )
        if not path.exists()
    ]
    if not missing:
        return
    reason = "browser tests need " + " and ".join(missing)
    if os.environ.get("BOOKDAV_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def chromium() -> Iterator[Browser]:
    require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


def shoot(page: Page, name: str) -> None:
    """Full-page screenshots of what the page shows now, at 360 and 1280 px wide."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = page.viewport_size
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
        if width == 360:
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= 360, f"{name}: the page is {overflow} px wide at 360 px"
    if before:
        page.set_viewport_size(before)


def assert_accessible(page: Page) -> None:
    """axe-core finds no serious or critical violation on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate("axe.run()")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{page.url}: " + "; ".join(bad)


def check_page(page: Page, name: str, *, axe: bool = True) -> None:
    if axe:
        assert_accessible(page)
    shoot(page, name)


def tab_to(page: Page, selector: str, limit: int = 200) -> None:
    """Press Tab until the element matching `selector` has the focus."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(
            "s => document.activeElement && document.activeElement.matches(s)", selector
        ):
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline not in ("none", ""), f"no visible focus on {selector}"
            return
    raise AssertionError(f"Tab never reached {selector}")


@dataclass(frozen=True)
class BookablePage:
    provider: Provider
    slug: str

    @property
    def url(self) -> str:
        return f"{self.provider.server.base_url}/book/{self.provider.username}/{self.slug}"


def bookable(server: RunningServer) -> BookablePage:
    """A Europe/Berlin provider with Mon-Fri 09:00-17:00 hours and a 30-minute service."""
    provider = make_provider(server)
    service = requests.get(f"{server.base_url}/api/v1/services/{provider.service_id}").json()
    return BookablePage(provider, service["slug"])


@dataclass
class Launched:
    base_url: str
    process: subprocess.Popen[str]
    banner: list[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def launch(folder: Path, *args: str, server_extra: str = "", **config: Any) -> Launched:
    """`bookdav serve` with extra command-line `args` and `[server]` options; returns the
    banner lines printed before the first blank read."""
    path = write_config(folder, **config)
    text = path.read_text(encoding="utf-8").replace("port = 0\n", f"port = 0\n{server_extra}", 1)
    path.write_text(text, encoding="utf-8")
    log = (folder / "server.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        bookdav_command("serve", "--config", str(path), *args),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=clean_env(),
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    if "listening on " not in first:
        process.kill()
        raise RuntimeError("bookdav serve did not start:\n" + (folder / "server.log").read_text())
    base_url = first.rsplit("listening on ", 1)[1].strip()
    banner = [first.rstrip("\n")]
    expected = 3 + (2 if "--demo" in args else 0)
    while len(banner) < expected:
        banner.append(process.stdout.readline().rstrip("\n"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    return Launched(base_url, process, banner)
