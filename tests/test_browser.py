"""The demo chat in headless Chromium: pages talk, share one stream, resume, and explain failures.

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


def make_room(server: ServerProcess, room: str, text: str = "made") -> dict[str, Any]:
    """Post the room's first message (only a post makes a room)."""
    sent = requests.post(f"{server.url}/api/rooms/{room}/messages",
                         json={"nick": "srv", "text": text}, timeout=5)
    assert sent.status_code == 201
    return sent.json()  # type: ignore[no-any-return]


def open_pair(browser: Any, server: ServerProcess, room: str, mode: str) -> tuple[Page, Page]:
    make_room(server, room)
    pages = (
        Page(browser, f"{server.url}/?room={room}&nick=ann&mode={mode}", new_window=False),
        Page(browser, f"{server.url}/?room={room}&nick=bob&mode={mode}", new_window=True),
    )
    # The windows share one stream (the leader's): EventSource's open event
    # comes after the subscription was registered.
    for page in pages:
        assert wait_until(lambda p=page: p.js("return window.chatState.live"), timeout=5)
    key = "subscribers" if mode == "sse" else "polls"
    assert wait_until(lambda: state(server, room)[key] == 1, timeout=5)
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
    make_room(server, room)
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


def submit(page: Page, text: str) -> None:
    """Put ``text`` in the message box and press Send (faster than typing it)."""
    page.js("document.getElementById('text').value = arguments[0];"
            "document.getElementById('send').click()", text)


def error_line(page: Page) -> str:
    return page.js("return document.getElementById('error').textContent")  # type: ignore[no-any-return]


def _one_connection(server: ServerProcess, room: str, mode: str) -> bool:
    """The room has one stream (SSE), or one pending long-poll and no stream (poll)."""
    now = state(server, room)
    if mode == "sse":
        return bool(now["subscribers"] == 1)
    return bool((now["subscribers"], now["polls"]) == (0, 1))


@pytest.mark.parametrize("mode", ["sse", "poll"])
def test_seven_tabs_share_one_stream_and_can_still_send(
    browser: Any, server: ServerProcess, mode: str
) -> None:
    # A browser opens at most six HTTP/1.1 connections to one site: seven tabs
    # with a stream (or a long-poll) each would leave no connection for a post.
    room = f"seven-{mode}"
    make_room(server, room)
    pages = [
        Page(browser, f"{server.url}/?room={room}&nick=tab{n}&mode={mode}", new_window=n > 0)
        for n in range(7)
    ]
    try:
        for page in pages:
            assert wait_until(lambda p=page: p.js("return window.chatState.live"), timeout=10)
        assert wait_until(lambda: _one_connection(server, room, mode), timeout=10)
        submit(pages[6], "from the seventh tab")
        for page in pages:
            page.wait_for("from the seventh tab", timeout=10)
        assert pages[6].js("return document.getElementById('text').value") == ""

        # The leading tab closes: another takes over from the last id it saw.
        (leader,) = [p for p in pages if p.js("return window.chatState.leader")]
        leader.close()
        pages.remove(leader)
        assert wait_until(
            lambda: sum(bool(p.js("return window.chatState.leader")) for p in pages) == 1,
            timeout=5,
        )
        assert wait_until(lambda: _one_connection(server, room, mode), timeout=10)
        make_room(server, room, "after the leader left")
        for page in pages:
            page.wait_for("after the leader left", timeout=10)
            assert [m["text"] for m in page.log()].count("after the leader left") == 1
    finally:
        for page in reversed(pages):
            page.close()


def test_a_refused_send_keeps_the_text_and_says_why(browser: Any, server: ServerProcess) -> None:
    make_room(server, "refused")
    page = Page(browser, f"{server.url}/?room=refused&nick=ann&mode=sse", new_window=False)
    try:
        assert wait_until(lambda: page.js("return window.chatState.live"), timeout=10)
        long_text = "x" * 100_000  # a paste: not cut short, not sent
        submit(page, long_text)
        assert error_line(page) == (
            "Not sent: 100000 characters; a message is at most 2000."
        )
        assert page.js("return document.getElementById('text').value") == long_text
        # The server refuses what the page cannot check: its reason is shown.
        page.js("document.getElementById('nick').value = 'n'.repeat(33)")
        submit(page, "hello")
        assert error_line(page) == "Not sent: a nickname is 1 to 32 characters."
    finally:
        page.close()


def test_an_invalid_room_name_is_explained_not_retried(
    browser: Any, server: ServerProcess
) -> None:
    page = Page(browser, f"{server.url}/?room=Bad%20Room&nick=ann", new_window=False)
    try:
        status = page.js("return document.getElementById('status').textContent")
        assert status == "not connected: a room name is 1 to 32 of a-z, 0-9, - and _"
        assert page.js("return window.chatState.mode") is None  # nothing was requested
    finally:
        page.close()


def test_a_server_that_went_away_is_reported_and_the_text_kept(browser: Any) -> None:
    with ServerProcess("detach-server", "tests.chat_app:app") as gone:
        make_room(gone, "gone")
        page = Page(browser, f"{gone.url}/?room=gone&nick=ann&mode=sse", new_window=False)
        assert wait_until(lambda: page.js("return window.chatState.live"), timeout=10)
    try:
        submit(page, "anyone there?")
        assert wait_until(lambda: error_line(page) != "", timeout=12)
        assert error_line(page) == (
            "Not sent, your text is kept: the server cannot be reached."
        )
        assert page.js("return document.getElementById('text').value") == "anyone there?"
        assert wait_until(
            lambda: "the server is not answering" in page.js(
                "return document.getElementById('status').textContent"), timeout=10)
    finally:
        page.close()


def test_the_nickname_is_kept_across_a_reload(browser: Any, server: ServerProcess) -> None:
    page = Page(browser, f"{server.url}/?room=lobby", new_window=False)
    try:
        page.js("const nick = document.getElementById('nick'); nick.value = 'zoe';"
                "nick.dispatchEvent(new Event('change'))")
        page.driver.get(f"{server.url}/?room=lobby")
        assert page.js("return document.getElementById('nick').value") == "zoe"
    finally:
        page.close()


def test_the_whole_history_shows_and_the_resync_notice_stays(
    browser: Any, server: ServerProcess
) -> None:
    from tests.chat_app import HISTORY

    room = "whole"
    for n in range(HISTORY):
        make_room(server, room, f"old {n}")
    page = Page(browser, f"{server.url}/?room={room}&nick=ann&mode=sse", new_window=False)
    shown = ("return [...document.querySelectorAll('#messages li[data-id]')]"
             ".map(li => li.lastChild.textContent)")
    try:
        assert wait_until(lambda: page.js("return window.chatState.live"), timeout=10)
        assert page.js(shown) == [f"old {n}" for n in range(HISTORY)]

        # Away for longer than the history: more messages than it keeps.
        dropped = requests.get(f"{server.url}/_test/drop?room={room}&how=finish", timeout=10)
        assert dropped.json() == {"dropped": 1}
        for n in range(HISTORY + 5):
            make_room(server, room, f"new {n}")
        assert state(server, room)["subscribers"] == 0  # all of it fell in the gap

        notices = ("return [...document.querySelectorAll('#messages li.notice')]"
                   ".map(li => li.textContent)")
        assert wait_until(
            lambda: page.js(notices) == ["Missed too much while away; reloaded."], timeout=10)
        assert page.js(shown) == [f"new {n}" for n in range(5, HISTORY + 5)]
    finally:
        page.close()


def test_a_send_past_the_connection_limit_says_why_and_keeps_the_text(
    browser: Any, server: ServerProcess
) -> None:
    # Six rooms, six streams: every connection a browser opens to one site.
    # (Tabs of one room share a stream; tabs of different rooms cannot.)
    rooms = [f"limit{n}" for n in range(6)]
    for room in rooms:
        make_room(server, room)
    # An origin of its own (localhost, not 127.0.0.1): the connections the
    # browser may still hold for the other tests' pages are not counted here.
    origin = f"http://localhost:{server.port}"
    pages = [Page(browser, f"{origin}/?room={room}&nick=ann&mode=sse", new_window=n > 0)
             for n, room in enumerate(rooms)]
    text = "return document.getElementById('text').value"
    try:
        for page in pages:
            assert wait_until(lambda p=page: p.js("return window.chatState.live"), timeout=10)
        submit(pages[0], "is anyone there?")
        assert wait_until(lambda: error_line(pages[0]) != "", timeout=15)
        assert error_line(pages[0]) == (
            "Not sent, your text is kept: no answer within 10 s (is the server down? a browser "
            "opens at most six connections to one site: close other tabs of this chat)."
        )
        assert pages[0].js(text) == "is anyone there?"
        pages[5].close()  # a connection frees: the same text goes through
        pages.pop()
        submit(pages[0], "is anyone there?")
        pages[0].wait_for("is anyone there?", timeout=10)
        assert pages[0].js(text) == ""
    finally:
        for page in reversed(pages):
            page.close()
