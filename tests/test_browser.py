"""The demo chat in headless Chromium: two pages talk; a dropped EventSource resumes exactly once.

Chromium is driven through selenium and Debian's chromedriver. The tests are
skipped, saying why, only where Chromium or its driver is not installed
(.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.client import wait_until
from tests.servers import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
        "chromium-driver; .ci/run does)",
    ),
]

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Two windows, one visible at a time: keep the hidden one running at full speed.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows", "--window-size=900,700",
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # As the demo runs: make_server's pywsgi, DetachMiddleware in front.
    with ServerProcess("detach-server", "tests.chat_app:app") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="wsgi-detach-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(5)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """One chat window in the shared browser."""

    def __init__(self, driver: Any, url: str, *, new_window: bool) -> None:
        self.driver = driver
        if new_window:
            driver.switch_to.new_window("window")
        self.handle = driver.current_window_handle
        driver.get(url)

    def js(self, script: str, *args: object) -> Any:
        self.driver.switch_to.window(self.handle)
        return self.driver.execute_script(script, *args)

    def log(self) -> list[dict[str, Any]]:
        return self.js("return window.chatLog")  # type: ignore[no-any-return]

    def say(self, text: str) -> float:
        """Type ``text`` into the page and press Enter; returns the browser's clock (ms)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        sent_at = float(self.js("return Date.now()"))
        self.driver.find_element(By.ID, "text").send_keys(text, Keys.ENTER)
        return sent_at

    def wait_for(self, text: str, timeout: float = 3.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def arrived() -> bool:
            found[:] = [m for m in self.log() if m["text"] == text]
            return bool(found)

        assert wait_until(arrived, timeout=timeout, interval=0.02), f"{text!r} never arrived"
        return found[0]

    def close(self) -> None:
        self.driver.switch_to.window(self.handle)
        if len(self.driver.window_handles) > 1:
            self.driver.close()
            self.driver.switch_to.window(self.driver.window_handles[0])
        else:
            self.driver.get("about:blank")


def state(server: ServerProcess, room: str) -> dict[str, Any]:
    return requests.get(f"{server.url}/_test/state?room={room}", timeout=5).json()  # type: ignore[no-any-return]


def open_pair(browser: Any, server: ServerProcess, room: str, mode: str) -> tuple[Page, Page]:
    pages = (
        Page(browser, f"{server.url}/?room={room}&nick=ann&mode={mode}", new_window=False),
        Page(browser, f"{server.url}/?room={room}&nick=bob&mode={mode}", new_window=True),
    )
    if mode == "sse":
        # EventSource's open event: the subscription was registered before it.
        for page in pages:
            assert wait_until(lambda p=page: p.js("return window.chatState.live"), timeout=5)
    else:
        assert wait_until(lambda: state(server, room)["polls"] == 2, timeout=5)
    return pages


@pytest.mark.parametrize("mode", ["sse", "poll"])
def test_a_message_typed_in_one_page_appears_in_the_other_within_a_second(
    browser: Any, server: ServerProcess, mode: str
) -> None:
    room = f"pair-{mode}"
    ann, bob = open_pair(browser, server, room, mode)
    try:
        turns = [(ann, bob, "hello from ann"), (bob, ann, "hi ann \u00e9\U0001f600")]
        for speaker, listener, text in turns:
            sent_at = speaker.say(text)
            started = time.monotonic()
            received = listener.wait_for(text, timeout=3)
            assert time.monotonic() - started < 1.0, f"{mode}: {text!r} took too long"
            assert received["at"] - sent_at < 1000
            own_nick = speaker.js("return document.getElementById('nick').value")
            assert speaker.wait_for(text)["nick"] == own_nick
        assert [m["text"] for m in ann.log()] == [m["text"] for m in bob.log()]
        shot = os.environ.get("CHAT_SCREENSHOT")
        if shot and mode == "sse":
            ann.driver.switch_to.window(ann.handle)
            ann.driver.save_screenshot(shot)
    finally:
        bob.close()
        ann.close()


@pytest.mark.parametrize("how", ["finish", "reset"])
def test_a_dropped_event_source_resumes_with_last_event_id_exactly_once(
    browser: Any, server: ServerProcess, how: str
) -> None:
    room = f"drop-{how}"
    page = Page(browser, f"{server.url}/?room={room}&nick=ann&mode=sse", new_window=False)
    try:
        assert wait_until(lambda: page.js("return window.chatState.live"), timeout=5)
        post = f"{server.url}/api/rooms/{room}/messages"
        before = requests.post(post, json={"nick": "srv", "text": "before"}, timeout=5).json()
        page.wait_for("before")

        dropped = requests.get(f"{server.url}/_test/drop?room={room}&how={how}", timeout=5)
        assert dropped.json() == {"dropped": 1}
        assert wait_until(lambda: state(server, room)["subscribers"] == 0, timeout=3)
        requests.post(post, json={"nick": "srv", "text": "during the gap"}, timeout=5)
        # Still nobody subscribed after the publish: it really fell in the gap.
        assert state(server, room)["subscribers"] == 0

        page.wait_for("during the gap", timeout=5)
        requests.post(post, json={"nick": "srv", "text": "after"}, timeout=5)
        page.wait_for("after")
        log = page.log()
        texts = [m["text"] for m in log]
        assert texts.count("during the gap") == 1
        assert texts[-3:] == ["before", "during the gap", "after"]
        assert before["id"].isdigit()  # the app's own id, not one the hub numbered
        assert log[-3]["id"] == before["id"]  # EventSource's lastEventId is the app's id
        assert state(server, room)["last_event_ids"] == [None, before["id"]]
        assert page.js("return window.chatState.connects") == 2
    finally:
        page.close()
