"""Hub.publish's vocabulary as Chromium's EventSource sees it.

The page (``/page/events`` in tests/pattern_apps.py) opens one EventSource on
a hub and logs every event, open and error with the browser's clock. The
browser set-up is tests/test_browser.py's (skipped, saying why, where Chromium
or its driver is missing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests import test_browser
from tests.client import get_json, wait_until
from tests.servers import ServerProcess
from tests.test_vocabulary import EDGE_DATA, REFUSED, expected

# The browser fixture and the skip where Chromium is missing, as the chat tests have them.
pytestmark = test_browser.pytestmark
browser = test_browser.browser


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("detach-server", "tests.pattern_apps:app") as proc:
        yield proc


class Page:
    def __init__(self, driver: Any, server: ServerProcess, hub: str) -> None:
        self.driver = driver
        self.server = server
        self.hub = hub
        driver.get(f"{server.url}/page/events?hub={hub}")
        assert wait_until(lambda: len(self.js("return window.opens")) == 1, timeout=5)

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def got(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The events the page received, once there are at least ``n`` (bounded wait)."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = self.js("return window.got")
            return len(found) >= n

        assert wait_until(enough, timeout=timeout, interval=0.02), f"only {found}"
        return found

    def publish(self, data: Any, **fields: Any) -> requests.Response:
        return requests.post(
            f"{self.server.url}/hub/publish?hub={self.hub}",
            json={"data": data, **fields},
            timeout=10,
        )

    def drop(self) -> None:
        """End every stream of the hub from the server side (cleanly)."""
        ended = get_json(self.server.port, f"/hub/disconnect?hub={self.hub}")
        assert ended == {"ended": 1}

    def connects(self) -> dict[str, Any]:
        """The hub's SSE requests and drops, on the server's clock (see pattern_apps)."""
        return get_json(self.server.port, f"/hub/connects?hub={self.hub}")  # type: ignore[no-any-return]

    def subscribers(self) -> int:
        return int(get_json(self.server.port, f"/hub/stats?hub={self.hub}")["subscribers"])

    def close(self) -> None:
        self.driver.get("about:blank")


def test_explicit_ids_arrive_as_last_event_id_and_a_reconnect_replays_exactly_what_came_after(
    browser: Any, server: ServerProcess
) -> None:
    page = Page(browser, server, f"b-ids-{time.monotonic_ns()}")
    try:
        page.publish("row 1", id="row-1", retry=800)  # a gap long enough to publish into
        page.publish("row 2", id="row-2")
        got = page.got(2)
        assert [(e["data"], e["lastEventId"]) for e in got] == [
            ("row 1", "row-1"),
            ("row 2", "row-2"),
        ]
        page.drop()
        assert wait_until(lambda: page.subscribers() == 0, timeout=3)
        page.publish("row 3", id="row-3")
        page.publish("row 4", id=4)
        assert page.subscribers() == 0  # both really fell into the gap
        got = page.got(4)
        page.publish("row 5", id="row-5")
        got = page.got(5)
        assert [(e["data"], e["lastEventId"]) for e in got] == [
            ("row 1", "row-1"),
            ("row 2", "row-2"),
            ("row 3", "row-3"),
            ("row 4", "4"),
            ("row 5", "row-5"),
        ]
        connects = page.connects()["connects"]
        assert [last_id for last_id, _ in connects] == [None, "row-2"]
        assert len(page.js("return window.opens")) == 2
    finally:
        page.close()


def test_a_per_event_retry_sets_the_browsers_reconnection_delay(
    browser: Any, server: ServerProcess
) -> None:
    """The stream starts with retry 3000 ms; an event's own retry replaces it."""
    delays = {}
    for retry in (200, 1500):
        page = Page(browser, server, f"b-retry-{retry}-{time.monotonic_ns()}")
        try:
            page.publish(f"retry {retry}", retry=retry)
            page.got(1)
            page.drop()
            assert wait_until(lambda p=page: len(p.connects()["connects"]) == 2, timeout=6)
            seen = page.connects()
            # From the moment the server began to end the stream to the
            # reconnecting request, both on the server's clock: the browser
            # can only start waiting after that moment.
            delays[retry] = seen["connects"][1][1] - seen["drops"][0]
        finally:
            page.close()
    print("reconnection delays (s):", delays)
    # Measured from the server's side: the drop, then the reconnecting request.
    assert 0.2 <= delays[200] < 1.0, delays
    assert 1.5 <= delays[1500] < 2.8, delays  # not the stream's own 3000 ms


def test_data_edge_cases_arrive_exactly_in_the_browser(browser: Any, server: ServerProcess) -> None:
    page = Page(browser, server, f"b-edge-{time.monotonic_ns()}")
    try:
        for data in EDGE_DATA.values():
            assert page.publish(data).status_code == 200
        got = page.got(len(EDGE_DATA))
        for (name, data), event in zip(EDGE_DATA.items(), got):
            assert event["data"] == expected(data), name
    finally:
        page.close()


def test_refused_fields_send_the_browser_nothing(browser: Any, server: ServerProcess) -> None:
    page = Page(browser, server, f"b-refused-{time.monotonic_ns()}")
    try:
        page.publish("kept", id="taken")
        page.got(1)
        for fields, message in REFUSED:
            answer = page.publish("never", **fields)
            assert (answer.status_code, answer.text[: len(message)]) == (400, message)
        page.publish("sentinel", id="s")
        # One stream, one order: anything sent for a refused call would come before this.
        got = page.got(2)
        assert [(e["data"], e["lastEventId"]) for e in got] == [
            ("kept", "taken"),
            ("sentinel", "s"),
        ]
    finally:
        page.close()
