"""The status page in a real browser: Debian's headless Chromium, driven through chromedriver by selenium,
against a running `wanbox serve` (the fake pool worker stands in for the GPU).

Checks the rendered DOM: a running job's progress advances, a delivered job's poster has loaded, a failure
shows its reason. Keeps a screenshot in the test's tmp dir (WANBOX_SCREENSHOT=PATH copies it there too).
Without Chromium it skips, except under CI (env CI set), where it must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemon.hosts import HostRecords
from tests.workers.harness import Root, manifest_text, wait_for

# Options this machine needs: no sandbox (root in a container), no GPU, nothing fetched from the network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1100")


def browser_or_skip() -> tuple[str, str]:
    """Chromium's and chromedriver's paths; a skip with the reason when missing (a failure under CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "the selenium package (pip install -e '.[test]')"
    else:
        missing = "" if chromium and driver else "chromium and chromedriver (apt-get install chromium chromium-driver)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {missing} is missing")
        pytest.skip(f"needs {missing}")
    return chromium, driver  # type: ignore[return-value]


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit chromedriver: selenium's own driver download is never tried (there is no network).
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield browser
    finally:
        browser.quit()


def web_url(r: Root) -> str:
    found: list[str] = []

    def listening() -> bool:
        with r.ledger() as ledger:
            found[:] = [h.web_url for h in HostRecords(ledger.engine).hosts() if h.web_url]
        return bool(found)

    wait_for(listening, 20, lambda: f"the daemon never published its page's URL\n{r.log_text()[-3000:]}")
    return found[0]


def dom_step(browser: Any, job_id: str) -> int:
    """The step the page shows for a running job (-1 while it is not on the page)."""
    return int(browser.execute_script(
        "const s = document.querySelector(`.running[data-job='${arguments[0]}'] .step`);"
        "return s ? Number(s.textContent) : -1;", job_id))


def until(browser: Any, predicate: Any, seconds: float, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(predicate, what)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_page_in_chromium_shows_progress_advancing_a_loaded_poster_and_a_failure(tmp_path: Path) -> None:
    browser_or_skip()
    r = Root(tmp_path, web={"enabled": True, "port": 0})
    r.knobs({"slow": {"step_seconds": 0.4}, "broken": {"error": "input"}})
    try:
        r.serve()
        r.drop("cat", manifest_text())
        r.drop("broken", manifest_text(image='"broken.jpg"', prompt="broken"), image="broken.jpg")
        cat = r.wait_state("cat", "done")
        r.wait_state("broken", "failed")
        r.drop("slow", manifest_text(steps=80, image='"slow.jpg"', prompt="slow"), image="slow.jpg")
        slow = r.wait_state("slow", "sampling")
        r.drop("next", manifest_text(image='"next.jpg"', prompt="next", extra="priority = 5"), image="next.jpg")
        url = web_url(r)
        poster = Image.open(cat.outputs_json["poster"]).size

        with chromium(tmp_path / "chromium-profile") as browser:
            browser.get(url)
            first = until(browser, lambda b: max(0, dom_step(b, slow.id)), 20, "the running job never appeared")
            until(browser, lambda b: dom_step(b, slow.id) > first, 15, f"the progress stayed at step {first}")
            value = browser.execute_script(
                "return document.querySelector(`.running[data-job='${arguments[0]}'] progress`).value", slow.id)
            assert value > first
            width = until(browser, lambda b: b.execute_script(
                "const i = document.querySelector(`figure[data-job='${arguments[0]}'] img.poster`);"
                "return i && i.complete && i.naturalWidth;", cat.id), 10, "the poster never loaded")
            assert (width, browser.execute_script(
                "return document.querySelector('img.poster').naturalHeight")) == poster
            links = browser.execute_script(
                "return [...document.querySelectorAll(`figure[data-job='${arguments[0]}'] a`)].map(a => a.href)", cat.id)
            assert f"{url}files/cat.mp4" in links and f"{url}files/cat.json" in links
            failure = until(browser, lambda b: b.execute_script(
                "const r = document.querySelector('#failures tr[data-job]'); return r && r.textContent"), 10,
                "no failure row")  # fmt: skip
            assert "broken" in failure and "injected input error" in failure
            until(browser, lambda b: "next" in b.find_element("id", "queue").text, 10, "the queued job is not shown")
            assert "serving" in browser.find_element("id", "daemon").text
            shot = tmp_path / "status-page.png"
            assert browser.save_screenshot(str(shot))
        with Image.open(shot) as image:
            assert image.format == "PNG" and image.size[0] >= 1000
        if os.environ.get("WANBOX_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["WANBOX_SCREENSHOT"])
        assert r.stop() == 0
    finally:
        r.cleanup()
