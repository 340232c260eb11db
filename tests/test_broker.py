"""RedisBroker and ChannelHub against a real redis-server (tests/redis_server.py).

Two brokers in one test process stand for two serving processes: each has
its own receiving connection, replica and publishing pool, as a process
would. The multi-process tests are in tests/test_scale_out.py.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer
from wsgi_detach import (
    BrokerRefused,
    BrokerUnavailable,
    ByteBudget,
    DetachedBody,
    EventStream,
    Message,
    RedisBroker,
)
from wsgi_detach._broker import ChannelHub
from wsgi_detach._redis import READ_TTL

# Short timeouts, so that the fault tests take seconds (the bounds they check
# are computed from these).
FAST = {
    "connect_timeout": 0.5,
    "socket_timeout": 0.5,
    "probe_interval": 0.5,
    "probe_timeout": 0.5,
    "backoff_max": 0.5,
    "linger": 0.2,
}
#: publish() raises within connect_timeout + 3 * socket_timeout (the docs' bound).
PUBLISH_BOUND = FAST["connect_timeout"] + 3 * FAST["socket_timeout"]


@pytest.fixture
def brokers(redis_server: RedisServer) -> Iterator[tuple[RedisBroker, RedisBroker]]:
    a = RedisBroker(redis_server.url, history=500, **FAST)
    b = RedisBroker(redis_server.url, history=500, **FAST)
    yield a, b
    a.close()
    b.close()


class Reader:
    """A subscribed plain body read in a thread; ``lines`` are its NDJSON messages."""

    def __init__(self, hub: ChannelHub, last_event_id: str | None = None) -> None:
        self.body = DetachedBody(idle_timeout=30)
        self.lines: list[dict[str, object]] = []
        self.error: BaseException | None = None
        self._buf = b""
        self.sub = hub.subscribe(self.body, last_event_id=last_event_id)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for chunk in self.body:
                self._buf += bytes(chunk)
                *complete, self._buf = self._buf.split(b"\n")
                self.lines.extend(json.loads(line) for line in complete)
        except BaseException as exc:
            self.error = exc

    def wait(self, n: int, timeout: float = 10.0) -> list[dict[str, object]]:
        give_up = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < give_up and self.error is None:
            time.sleep(0.01)
        assert len(self.lines) >= n, f"got {len(self.lines)} of {n}: {self.lines[-3:]}"
        return self.lines

    def ids(self) -> list[object]:
        return [line["id"] for line in self.lines if line["event"] != "resync"]

    def close(self) -> None:
        self.body.close()


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition not met in time"
        time.sleep(0.01)


def test_a_message_reaches_the_other_process_with_the_same_id(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    reader = Reader(b.hub("room"))
    wait_for(lambda: b.stats()["connected"])
    sent = a.hub("room").publish({"text": "hi"}, event="chat")
    (line,) = reader.wait(1)
    assert line == {"id": sent.id, "event": "chat", "data": {"text": "hi"}}
    assert sent.id.endswith("-1")
    assert a.stats()["receiving"] is False  # a publisher holds no receiving connection


def test_resume_on_another_process_gets_exactly_what_was_missed(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    first = Reader(a.hub("room"))
    sent = [a.hub("room").publish(f"m{i}") for i in range(5)]
    first.wait(5)
    first.close()  # the client leaves after m1...
    resumed = Reader(b.hub("room"), last_event_id=sent[1].id)  # ...and comes back on B
    later = b.hub("room").publish("m5")
    resumed.wait(4)
    assert resumed.ids() == [m.id for m in sent[2:]] + [later.id]
    marker = a.hub("room").publish("m6")  # nothing doubled arrives before it
    assert resumed.wait(5)[4]["id"] == marker.id and len(resumed.lines) == 5


def test_a_resuming_stream_with_no_room_at_all_is_ended_not_left_silent(brokers) -> None:  # type: ignore[no-untyped-def]
    # As with the in-process hub: with the shared budget full, a subscriber
    # that can be given neither its catch-up nor a resync is ended, so that
    # the browser reconnects, instead of staying open and silent.
    a, _ = brokers
    hub = a.hub("full")
    first = hub.publish("x" * 50)
    hub.publish("y" * 50)
    budget = ByteBudget(300)
    hog = DetachedBody(budget=budget)
    hog.put_nowait(b"h" * 280)
    stream = EventStream(heartbeat=None, budget=budget, last_event_id=first.id)
    sub = hub.subscribe(stream)
    wait_for(lambda: stream.state == "finished")
    assert not sub.active and hub.subscribers == 0
    assert list(stream) == [b": stream open\n"]
    hog.close()
    stream.close()
    assert budget.used == 0


def test_an_id_of_the_application_resumes_on_another_process(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    hub = a.hub("orders")
    hub.publish("one", id="order-1")
    hub.publish("two", id="order-2")
    batch = b.hub("orders").since("order-1")
    assert [m.id for m in batch.messages] == ["order-2"] and not batch.resync
    with pytest.raises(ValueError, match="already published"):
        b.hub("orders").publish("again", id="order-2")


def test_an_application_id_shaped_like_an_epoch_id_resumes(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    hub = a.hub("shaped")
    first = hub.publish("zero")
    # Not the channel's epoch, so allowed; shaped like "<epoch>-<seq>".
    other = "abcdef" if not first.id.startswith("abcdef") else "fedcba"
    hub.publish("one", id=f"{other}-7")
    two = hub.publish("two")
    batch = b.hub("shaped").since(f"{other}-7")  # b does not follow: Redis says
    assert [m.id for m in batch.messages] == [two.id] and not batch.resync
    reader = Reader(b.hub("shaped"), last_event_id=f"{other}-7")
    assert reader.wait(1) == [{"id": two.id, "event": None, "data": "two"}]


def test_two_publishers_one_order_nothing_lost_or_doubled(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    readers = [Reader(a.hub("race")), Reader(b.hub("race"))]
    wait_for(lambda: a.stats()["connected"] and b.stats()["connected"])

    def hammer(broker: RedisBroker, tag: str) -> None:
        for i in range(150):
            broker.hub("race").publish(f"{tag}{i}")

    threads = [threading.Thread(target=hammer, args=(x, tag)) for x, tag in ((a, "a"), (b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    orders = [[line["data"] for line in r.wait(300)] for r in readers]
    assert orders[0] == orders[1]
    expected = [f"a{i}" for i in range(150)] + [f"b{i}" for i in range(150)]
    assert sorted(orders[0]) == sorted(expected)  # type: ignore[type-var]
    assert [f for f in orders[0] if f[0] == "a"] == [f"a{i}" for i in range(150)]


def test_long_poll_cursor_from_one_process_works_on_the_other(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    sent = [a.hub("poll").publish(i) for i in range(3)]
    got: list[object] = []
    batch = b.hub("poll").poll(sent[0].id, got.append)
    assert batch is not None and [m.data for m in batch.messages] == [1, 2]
    assert b.hub("poll").poll(batch.cursor, got.append) is None  # waits
    a.hub("poll").publish("next")
    wait_for(lambda: got)
    assert [m.data for m in got[0].messages] == ["next"]  # type: ignore[attr-defined]


def test_pubsub_connection_killed_during_a_burst(redis_server: RedisServer, brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    readers = [Reader(b.hub("burst")) for _ in range(3)]
    wait_for(lambda: b.stats()["connected"])
    sent = []
    for i in range(300):
        sent.append(a.hub("burst").publish(i).id)
        if i == 100:
            assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    for reader in readers:
        reader.wait(300)
        assert reader.ids() == sent  # every message once, in order
    assert b.stats()["reconnects"] >= 1


def test_redis_stopped_then_restarted_with_its_data(redis_server_aof: RedisServer, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "wsgi_detach")
    a = RedisBroker(redis_server_aof.url, **FAST)
    b = RedisBroker(redis_server_aof.url, **FAST)
    try:
        stream = EventStream(heartbeat=0.2)
        b.hub("r").subscribe(stream)
        reader = Reader(b.hub("r"))
        before = [a.hub("r").publish(i).id for i in range(3)]
        reader.wait(3)
        redis_server_aof.stop()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            a.hub("r").publish("lost")
        assert time.monotonic() - started < PUBLISH_BOUND + 0.5
        wait_for(lambda: not b.stats()["connected"], 5)
        assert stream.state == "open" and reader.body.state == "open"
        redis_server_aof.restart(keep_data=True)
        after = [a.hub("r").publish(i).id for i in range(3, 6)]
        reader.wait(6)
        assert reader.ids() == before + after
        assert after[0].split("-")[0] == before[0].split("-")[0]  # same epoch: data kept
        lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1, lost  # logged once per outage
    finally:
        a.close()
        b.close()


def test_redis_restarted_empty_gives_a_resync(redis_server: RedisServer) -> None:
    a = RedisBroker(redis_server.url, **FAST)
    b = RedisBroker(redis_server.url, **FAST)
    try:
        hub = b.hub("r")
        reader = Reader(hub)
        old = [a.hub("r").publish(i).id for i in range(3)]
        reader.wait(3)
        redis_server.restart(keep_data=False)
        wait_for(lambda: b.stats()["connected"] and b.stats()["reconnects"] >= 1)
        new = a.hub("r").publish("after")
        epoch = new.id.split("-")[0]
        assert epoch != old[0].split("-")[0]  # a new epoch
        assert reader.wait(5)[3:] == [
            {"id": f"{epoch}-0", "event": "resync",
             "data": {"reason": "from another epoch", "cursor": f"{epoch}-0"}},
            {"id": new.id, "event": None, "data": "after"},
        ]
        # Redis loses the channel again, this time while the receiving
        # connection stays up (as after an eviction, a TTL or a failover):
        # the new epoch's first messages reach the subscribers after the
        # resync, and stay in this process's history.
        redis_server.command("FLUSHALL")
        new1, new2 = a.hub("r").publish("new1"), a.hub("r").publish("new2")
        epoch2 = new1.id.split("-")[0]
        assert epoch2 != epoch
        assert reader.wait(8)[5:] == [
            {"id": f"{epoch2}-0", "event": "resync",
             "data": {"reason": "from another epoch", "cursor": f"{epoch2}-0"}},
            {"id": new1.id, "event": None, "data": "new1"},
            {"id": new2.id, "event": None, "data": "new2"},
        ]
        assert [m.data for m in hub.recent().messages] == ["new1", "new2"]
        assert [m.data for m in hub.since(new1.id).messages] == ["new2"]
        late = Reader(hub, last_event_id=new1.id)
        assert late.wait(1) == [{"id": new2.id, "event": None, "data": "new2"}]
        # Nothing doubled: a later message is the next line of both.
        last = a.hub("r").publish("last")
        assert reader.wait(9)[8]["id"] == last.id and late.wait(2)[1]["id"] == last.id
        assert len(reader.lines) == 9 and len(late.lines) == 2
        # An id from before the loss is never taken for one of the new epoch.
        batch = a.hub("r").since(old[0])
        assert batch.resync and batch.messages == []
    finally:
        a.close()
        b.close()


def test_a_longer_stream_elsewhere_is_read_whole_after_a_reconnect(
    redis_server: RedisServer,
) -> None:
    # The publisher keeps 100 messages, the serving process only 10: after a
    # reconnect, the serving process reads everything it missed, not just its
    # own history's worth, and sends no resync since nothing is lost.
    publisher = RedisBroker(redis_server.url, history=100, **FAST)
    server = RedisBroker(redis_server.url, history=10, **FAST)
    try:
        reader = Reader(server.hub("h"))
        wait_for(lambda: server.stats()["connected"])
        publisher.hub("h").publish("m0")
        reader.wait(1)
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        sent = publisher.hub("h").publish_many(f"m{i}" for i in range(1, 31))
        reader.wait(31)
        last = publisher.hub("h").publish("m31")
        wait_for(lambda: last.id in reader.ids())
        assert [line["data"] for line in reader.lines] == [f"m{i}" for i in range(32)]
        assert len(server.hub("h").recent().messages) == 10
        # Read from Redis by a process that does not follow the channel,
        # since() returns at most its history, and a cursor to go on from.
        batch = server.hub("h").since(sent[0].id)
        assert batch.resync and batch.messages == []  # older than its history: it says so
        other = RedisBroker(redis_server.url, history=10, **FAST)
        try:
            batch = other.hub("h").since(sent[0].id)
            assert [m.data for m in batch.messages] == [f"m{i}" for i in range(2, 12)]
            assert batch.cursor == sent[10].id
            batch = other.hub("h").since(batch.cursor)
            assert [m.data for m in batch.messages] == [f"m{i}" for i in range(12, 22)]
        finally:
            other.close()
    finally:
        publisher.close()
        server.close()


def test_a_gap_the_stream_no_longer_holds_gives_a_resync_then_what_it_holds(
    redis_server: RedisServer,
) -> None:
    publisher = RedisBroker(redis_server.url, history=5, **FAST)
    server = RedisBroker(redis_server.url, history=50, **FAST)
    try:
        reader = Reader(server.hub("t"))
        wait_for(lambda: server.stats()["connected"])
        publisher.hub("t").publish("m0")
        reader.wait(1)
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        sent = publisher.hub("t").publish_many(f"m{i}" for i in range(1, 21))
        lines = reader.wait(7)
        assert lines[1] == {"id": sent[14].id, "event": "resync",
                            "data": {"reason": "older than the history", "cursor": sent[14].id}}
        assert [line["data"] for line in lines[2:]] == [f"m{i}" for i in range(16, 21)]
    finally:
        publisher.close()
        server.close()


def test_frozen_redis_publish_fails_in_bound_then_delivery_resumes(
    redis_server: RedisServer,
) -> None:
    a = RedisBroker(redis_server.url, **FAST)
    b = RedisBroker(redis_server.url, **FAST)
    try:
        reader = Reader(b.hub("f"))
        first = a.hub("f").publish("before").id
        reader.wait(1)
        redis_server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                a.hub("f").publish("frozen")
            assert time.monotonic() - started < PUBLISH_BOUND + 0.5
            # Deaf within probe_interval + probe_timeout (and a tick or two).
            wait_for(lambda: not b.stats()["connected"],
                     FAST["probe_interval"] + FAST["probe_timeout"] + 1.0)
        finally:
            redis_server.thaw()
        thawed = time.monotonic()
        # After SIGCONT: at most backoff_max + connect_timeout to reconnect.
        wait_for(lambda: b.stats()["connected"], 10)
        assert time.monotonic() - thawed < FAST["backoff_max"] + FAST["connect_timeout"] + 1.0
        later = a.hub("f").publish("after").id
        wait_for(lambda: later in reader.ids())
        # "frozen" timed out after it was sent: Redis may have run it (it did,
        # once thawed); whatever it holds arrives once, in order.
        ids = reader.ids()
        assert ids[0] == first and ids[-1] == later and len(ids) == len(set(ids))
    finally:
        a.close()
        b.close()


def test_a_fan_out_longer_than_the_probe_timeout_is_not_taken_for_a_dead_connection(
    brokers,
) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    reader = Reader(b.hub("slow"))
    wait_for(lambda: b.stats()["connected"])
    body = DetachedBody(idle_timeout=30)

    def slow(message: Message) -> bytes:  # a subscriber that takes long to encode for
        time.sleep(0.05)
        return f"{message.id}\n".encode()

    b.hub("slow").subscribe(body, last_event_id=None, encode=slow)
    sent = a.hub("slow").publish_many(range(40))  # 2 s of fan-out, probe_timeout 0.5 s
    got = b""
    for chunk in body:
        got += bytes(chunk)
        if got.count(b"\n") == 40:
            break
    assert got.decode().split() == [m.id for m in sent]
    assert b.stats()["reconnects"] == 0
    reader.wait(40)
    assert reader.ids() == [m.id for m in sent]
    body.close()


def test_one_receiving_connection_for_200_streams_over_5_channels(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url, **FAST)
    publisher = RedisBroker(redis_server.url, **FAST)
    try:
        bodies = [DetachedBody() for _ in range(200)]
        for i, body in enumerate(bodies):
            broker.hub(f"c{i % 5}").subscribe(body)
        wait_for(lambda: broker.stats()["channels"] == 5)
        for i in range(5):
            publisher.hub(f"c{i}").publish("x")
        wait_for(lambda: all(body.buffered for body in bodies))
        receiving = [c for c in redis_server.clients() if "P" in c["flags"]]
        assert len(receiving) == 1, receiving
        assert receiving[0]["sub"] == "6"  # 5 channels and the probe
        for body in bodies:
            body.close()
        wait_for(lambda: broker.stats()["channels"] == 0)  # unsubscribed after the last
    finally:
        broker.close()
        publisher.close()


def test_publish_to_a_redis_that_is_not_there(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.stop()
    broker = RedisBroker(url, **FAST)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="unreachable") as caught:
        broker.hub("x").publish("hello")
    assert time.monotonic() - started < PUBLISH_BOUND
    assert caught.value.maybe_applied is False


def test_configuration_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="url must start with one of redis://"):
        RedisBroker("http://localhost")
    with pytest.raises(ValueError, match="socket_timeout must be a positive number"):
        RedisBroker("redis://localhost", socket_timeout=0)
    with pytest.raises(ValueError, match="channel must be a one-line str"):
        RedisBroker("redis://localhost").hub("a\nb")


def test_every_key_of_a_channel_shares_one_hash_slot(redis_server: RedisServer) -> None:
    from redis.crc import key_slot

    broker = RedisBroker(redis_server.url, **FAST)
    try:
        for bad in ("}room", "a}b", "{x}", "room{"):
            with pytest.raises(ValueError, match=r"channel must be .* without '\{' or '\}'"):
                broker.hub(bad)
        with pytest.raises(ValueError, match="prefix must be a one-line str without"):
            RedisBroker(redis_server.url, prefix="app{1}")
        for name in ("room", "salle é 1", "a:b", "x" * 200):
            broker.hub(name).publish("x", id="own")  # the ids hash exists too
            keys = redis_server.command("KEYS", f"wsgi_detach:{{{name}}}*")
            assert len(keys) == 3
            slots = {key_slot(k.encode()) for k in [*keys, f"wsgi_detach:{{{name}}}"]}
            assert slots == {key_slot(name.encode())}
    finally:
        broker.close()


def test_clients_resuming_at_once_cost_one_read_of_the_channel(redis_server: RedisServer) -> None:
    publisher = RedisBroker(redis_server.url, **FAST)
    fresh = RedisBroker(redis_server.url, **FAST)  # a process that does not follow "busy" yet
    try:
        sent = [publisher.hub("busy").publish(i) for i in range(20)]
        redis_server.command("CONFIG", "RESETSTAT")
        readers = [Reader(fresh.hub("busy"), last_event_id=sent[i % 10].id) for i in range(50)]
        for i, reader in enumerate(readers):
            assert reader.wait(19 - i % 10)
            assert reader.ids() == [m.id for m in sent[i % 10 + 1 :]]
        stats = redis_server.command("INFO", "commandstats")
        scripts = sum(
            int(stats[key]["calls"]) for key in ("cmdstat_evalsha", "cmdstat_eval") if key in stats
        )
        assert scripts == 1, stats  # the channel's one read, for 50 resuming clients
    finally:
        publisher.close()
        fresh.close()


def test_publish_many_is_pipelined_and_in_order(brokers) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    reader = Reader(b.hub("batch"))
    wait_for(lambda: b.stats()["connected"])
    one = a.hub("batch").publish("first")
    batch = a.hub("batch").publish_many([{"n": i} for i in range(100)], event="n")
    assert [m.seq for m in batch] == list(range(one.seq + 1, one.seq + 101))
    lines = reader.wait(101)
    assert [line["id"] for line in lines] == [one.id] + [m.id for m in batch]
    assert lines[-1] == {"id": batch[-1].id, "event": "n", "data": {"n": 99}}
    assert a.hub("batch").publish_many([]) == []


def test_redis_out_of_memory_raises_broker_refused_saying_what_was_published(
    redis_server: RedisServer, brokers
) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    reader = Reader(b.hub("oom"))
    wait_for(lambda: b.stats()["connected"])
    hub = a.hub("oom")
    hub.publish("warm")
    used = int(redis_server.command("INFO", "memory")["used_memory"])
    redis_server.command("CONFIG", "SET", "maxmemory", str(used + 300_000))
    try:
        items = [f"{i}:" + "x" * 10_000 for i in range(100)]
        with pytest.raises(BrokerRefused, match=r"maxmemory.*published\)$") as caught:
            hub.publish_many(items)
        refused = caught.value
        assert isinstance(refused, BrokerUnavailable) and refused.maybe_applied is False
        published = refused.published
        assert published is not None and len(published) == 100
        done = [m for m in published if m is not None]
        assert 0 < len(done) < 100
        # Not always a prefix (Redis's memory use moves while it runs them):
        # each item says for itself, and the published ones are numbered in order.
        assert [m.seq for m in done] == sorted(m.seq for m in done)
        assert [m.data for m in done] == [d for d, m in zip(items, published) if m is not None]
        assert redis_server.command("XLEN", "wsgi_detach:{oom}:log") == len(done) + 1
        with pytest.raises(BrokerRefused, match="maxmemory") as one:
            hub.publish("one more")
        assert one.value.maybe_applied is False and one.value.published is None
        assert redis_server.command("XLEN", "wsgi_detach:{oom}:log") == len(done) + 1
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    # The caller retries what was not published: each item arrives once.
    rest = hub.publish_many(items[i] for i, m in enumerate(published) if m is None)
    assert len(rest) == 100 - len(done)
    lines = reader.wait(101)
    assert [line["id"] for line in lines[1:]] == [m.id for m in done + rest]
    assert sorted(str(line["data"]) for line in lines[1:]) == sorted(items)


def test_a_read_only_replica_refuses_publish_as_broker_refused(
    redis_server: RedisServer, brokers
) -> None:  # type: ignore[no-untyped-def]
    a, _ = brokers
    a.hub("ro").publish("before")
    redis_server.command("REPLICAOF", "127.0.0.1", "1")  # a master that is not there
    try:
        with pytest.raises(BrokerRefused, match="read only replica") as caught:
            a.hub("ro").publish("after")
        assert caught.value.maybe_applied is False
    finally:
        redis_server.command("REPLICAOF", "NO", "ONE")


def test_a_bad_stream_entry_is_logged_once_and_skipped_without_reconnecting(
    redis_server: RedisServer, brokers, caplog
) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    a.hub("bad").publish("ok")
    # An entry our publish script would never write: its text is not JSON.
    redis_server.command("HINCRBY", "wsgi_detach:{bad}:meta", "seq", 1)
    redis_server.command("XADD", "wsgi_detach:{bad}:log", "2-0", "i", "", "e", "", "j", "1",
                         "r", "", "d", "{not json")
    with caplog.at_level(logging.INFO, logger="wsgi_detach"):
        reader = Reader(b.hub("bad"), last_event_id=a.hub("bad").cursor.replace("-2", "-0"))
        after = a.hub("bad").publish("after")
        assert [line["data"] for line in reader.wait(2)] == ["ok", "after"]
        assert b.hub("bad").since(after.id.replace("-3", "-1")).messages[0].id == after.id
    assert b.stats()["reconnects"] == 0 and b.stats()["connected"]
    skipped = [r for r in caplog.records if "is not JSON" in r.getMessage()]
    assert len(skipped) == 1
    assert skipped[0].getMessage().startswith("skipped message ")
    assert "of channel 'bad'" in skipped[0].getMessage()


def test_a_session_refused_after_subscribing_backs_off_and_logs_once(
    redis_server: RedisServer, caplog
) -> None:  # type: ignore[no-untyped-def]
    # Pub/Sub works but the stream cannot be read (as while Redis loads its
    # data after a restart): the receiver must back off, not reconnect in a
    # tight loop, and must not report itself connected in between.
    a = RedisBroker(redis_server.url, **FAST)
    b = RedisBroker(redis_server.url, **FAST)
    try:
        a.hub("load").publish("m1")
        redis_server.command("ACL", "SETUSER", "default", "-eval", "-evalsha")
        try:
            with caplog.at_level(logging.INFO, logger="wsgi_detach"):
                reader = Reader(b.hub("load"))
                wait_for(lambda: b.stats()["reconnects"] >= 1)
                started, first = time.monotonic(), b.stats()["reconnects"]
                seen_connected = False
                while time.monotonic() - started < 2.0:
                    seen_connected = seen_connected or b.stats()["connected"]
                    time.sleep(0.005)
                attempts = b.stats()["reconnects"] - first
        finally:
            redis_server.command("ACL", "SETUSER", "default", "+@all")
        assert not seen_connected
        # Backoff 0.05 s doubling to backoff_max (0.5 s), jittered down to half:
        # at most 8 attempts in 2 s; a reset at every attempt makes about 50.
        assert attempts <= 9, attempts
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1 and "NoPermissionError" in lost[0].getMessage()
        assert not [r for r in caplog.records if "connection back" in r.getMessage()]
        wait_for(lambda: b.stats()["connected"])
        later = a.hub("load").publish("m2")
        wait_for(lambda: later.id in reader.ids())
        back = [r for r in caplog.records if "connection back" in r.getMessage()]
        assert len(back) == 1
    finally:
        a.close()
        b.close()


def test_a_channel_record_made_by_a_read_expires(redis_server: RedisServer) -> None:
    # Reads of names nobody publishes on (client-chosen room names) must not
    # grow Redis without bound.
    with_ttl = RedisBroker(redis_server.url, ttl=30, **FAST)
    without = RedisBroker(redis_server.url, **FAST)
    try:
        with_ttl.hub("read-ttl").recent()
        assert 0 < redis_server.command("TTL", "wsgi_detach:{read-ttl}:meta") <= 30
        cursor = without.hub("read-only").cursor
        assert 0 < redis_server.command("TTL", "wsgi_detach:{read-only}:meta") <= READ_TTL
        # The first publish keeps the epoch the read named, and the channel's
        # own lifetime: none without ttl, ttl with it.
        assert without.hub("read-only").publish("x").id == cursor.replace("-0", "-1")
        assert redis_server.command("TTL", "wsgi_detach:{read-only}:meta") == -1
        with_ttl.hub("read-ttl").publish("x")
        assert 0 < redis_server.command("TTL", "wsgi_detach:{read-ttl}:log") <= 30
    finally:
        with_ttl.close()
        without.close()


def test_an_id_of_another_epoch_gets_its_resync_at_once_on_a_quiet_channel(
    brokers, caplog  # type: ignore[no-untyped-def]
) -> None:
    a, b = brokers
    hub = b.hub("quiet")
    follower = Reader(hub)  # the channel is followed and in sync here
    sent = a.hub("quiet").publish("only")
    follower.wait(1)
    stale = "abcdef-" + sent.id.split("-")[1]  # an id from before a data loss
    late = Reader(hub, last_event_id=stale)
    (line,) = late.wait(1, timeout=5)  # no message needs to come for it
    assert line["event"] == "resync" and line["data"] == {  # type: ignore[comparison-overlap]
        "reason": "from another epoch",
        "cursor": sent.id,
    }
    batch = hub.poll(stale, lambda batch: None)  # a long-poll likewise, at once
    assert batch is not None and batch.resync and batch.reason == "from another epoch"
    assert hub.recent(0).messages == [] and [m.id for m in hub.recent().messages] == [sent.id]


def test_ids_the_replica_cannot_place_are_resolved_by_the_caller_not_the_receiver(
    brokers,
) -> None:  # type: ignore[no-untyped-def]
    a, b = brokers
    hub = b.hub("ids")
    first = Reader(hub)
    wait_for(lambda: b.stats()["connected"])
    a.hub("ids").publish("x", id="app-1")
    first.wait(1)
    # Garbage, and ids Redis must place: each subscribe() asks Redis itself
    # and returns with the catch-up (or resync) queued, so a crowd of them
    # never holds up the receiver, which delivers every channel's messages.
    for cursor in ("nope", "abcdef-99", "app-2"):
        body = DetachedBody(idle_timeout=30)
        hub.subscribe(body, last_event_id=cursor)
        assert body.buffered > 0, cursor
        body.close()
    bodies = [DetachedBody(idle_timeout=30) for _ in range(100)]
    for i, body in enumerate(bodies):
        hub.subscribe(body, last_event_id=f"garbage-{i}")
        assert body.buffered > 0
    sent = a.hub("ids").publish("y")
    wait_for(lambda: sent.id in first.ids())
    for body in bodies:
        body.close()


def test_a_malformed_notification_is_logged_and_read_from_the_stream(
    redis_server: RedisServer, brokers, caplog  # type: ignore[no-untyped-def]
) -> None:
    a, b = brokers
    reader = Reader(b.hub("odd"))
    wait_for(lambda: b.stats()["connected"])
    redis_server.command("PUBLISH", "wsgi_detach:{odd}", "not one of ours")
    sent = a.hub("odd").publish("fine")
    assert reader.wait(1) == [{"id": sent.id, "event": None, "data": "fine"}]
    assert any("malformed notification" in r.getMessage() for r in caplog.records)
    assert b.stats()["reconnects"] == 0


def test_a_broker_made_before_a_fork_connects_anew_in_the_child(redis_server: RedisServer) -> None:
    """gunicorn --preload: the broker is made in the master, used in the workers."""
    import os

    broker = RedisBroker(redis_server.url, **FAST)
    try:
        assert broker.hub("fork").publish("parent").seq == 1  # the parent's pool is open
        pid = os.fork()
        if pid == 0:  # the child: its own connections, never the parent's socket
            code = 1
            try:
                reader = Reader(broker.hub("fork"))
                sent = broker.hub("fork").publish("child")
                code = 0 if sent.seq == 2 and reader.wait(1)[0]["id"] == sent.id else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert broker.hub("fork").publish("parent again").seq == 3
    finally:
        broker.close()


def test_clients_resuming_while_messages_flow_get_each_once_in_order(brokers) -> None:  # type: ignore[no-untyped-def]
    """Catch-up and live delivery race on the receiving side: no gap, no double, one order."""
    import random

    a, b = brokers
    follower = Reader(b.hub("flow"))  # B follows the channel before the flow starts
    sent: list[str] = []
    done = threading.Event()

    def publish() -> None:
        for i in range(400):
            sent.append(a.hub("flow").publish(i).id)
        done.set()

    thread = threading.Thread(target=publish)
    thread.start()
    rng = random.Random(7)
    joined: list[tuple[int | None, Reader]] = []
    while not done.is_set() and len(joined) < 40:
        time.sleep(rng.uniform(0, 0.02))
        if sent and rng.random() < 0.8:
            k = rng.randrange(len(sent))
            joined.append((k, Reader(b.hub("flow"), last_event_id=sent[k])))
        else:
            joined.append((None, Reader(b.hub("flow"))))
    thread.join(60)
    assert len(sent) == 400 and len(joined) >= 5
    assert [line["id"] for line in follower.wait(400)] == sent
    for k, reader in joined:
        if k is None:  # from now: a contiguous tail (empty if it came after the last)
            give_up = time.monotonic() + 5
            while time.monotonic() < give_up and not (
                reader.lines and reader.lines[-1]["id"] == sent[-1]
            ):
                time.sleep(0.01)
            ids = reader.ids()
            assert ids == sent[len(sent) - len(ids) :]
        else:
            reader.wait(400 - k - 1)
            assert reader.ids() == sent[k + 1 :]


def test_without_redis_server_the_tests_skip_unless_required(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.redis_server import REQUIRE_ENV, require_redis

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        require_redis()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="WSGI_DETACH_REQUIRE_REDIS=1 requires it"):
        require_redis()


def test_a_channel_nobody_uses_leaves_no_hub_and_a_fresh_hub_resumes(brokers) -> None:  # type: ignore[no-untyped-def]
    """A process that touches many channels once keeps none of them: hubs are held
    while used (a reference, or followed until ``linger``), then go with their
    subscription and their history copy; a later ``hub()`` reads the channel afresh."""
    a, b = brokers
    for n in range(500):  # reads of channels nobody publishes to
        assert b.hub(f"junk{n}").recent().messages == []
    assert len(b._hubs) == 0
    sent = [a.hub("room").publish({"n": n}) for n in range(3)]
    reader = Reader(b.hub("room"), last_event_id=sent[0].id)
    assert [line["id"] for line in reader.wait(2)] == [m.id for m in sent[1:]]
    wait_for(lambda: b.stats()["channels"] == 1)
    reader.close()
    del reader
    wait_for(lambda: b.stats()["channels"] == 0)  # unsubscribed after the linger
    gc.collect()  # the closed body and its subscription form a cycle
    assert len(b._hubs) == 0  # and nothing holds the hub or its replica
    later = a.hub("room").publish({"n": 3})
    fresh = Reader(b.hub("room"), last_event_id=sent[2].id)
    assert [line["id"] for line in fresh.wait(1)] == [later.id]
    assert b.hub("room").recent().messages[-1].id == later.id
    fresh.close()


def test_a_subscriber_arriving_while_a_new_epoch_is_read_gets_a_resync_not_a_gap(
    redis_server: RedisServer, brokers
) -> None:  # type: ignore[no-untyped-def]
    """Redis lost the channel (flush, failover, expiry) while this process had
    nobody subscribed: the receiver reads the new epoch's latest history. A
    request that subscribes during that read is placed against the old epoch;
    it must get a resync and then every message of the new epoch, never a
    silent gap where the new epoch's first seqs overlap the old one's."""
    import redis

    a, b = brokers
    b.linger = 60.0  # the channel stays followed after its last user leaves
    for n in range(5):
        a.hub("room").publish({"old": n})
    hub = b.hub("room")  # held by the application, as a module-level hub would be
    first = Reader(hub)
    wait_for(lambda: b.stats()["connected"])
    a.hub("room").publish({"old": 5})
    first.wait(1)
    first.close()
    wait_for(lambda: hub.subscribers == 0)
    link = b._link()
    read = link.read
    entered, go = threading.Event(), threading.Event()
    boxes: list[Reader] = []

    def held_read(channel, after, count):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread() and not go.is_set():
            entered.set()  # the receiver's read of the new epoch: a request arrives now
            assert go.wait(10)
        return read(channel, after, count)

    link.read = held_read  # type: ignore[method-assign]
    keys = redis.Redis.from_url(redis_server.url)
    keys.delete(*keys.keys("*room*"))  # Redis lost the channel
    try:
        restarted = a.hub("room").publish({"new": 0})
        assert entered.wait(10)
        boxes.append(Reader(hub))
    finally:
        go.set()
        keys.close()
    late = boxes[0]
    later = [a.hub("room").publish({"new": n}) for n in range(1, 9)]
    late.wait(10)
    assert late.lines[0]["event"] == "resync"
    assert late.ids() == [restarted.id] + [m.id for m in later]
    late.close()


def test_a_waiting_poll_gets_a_resync_when_redis_loses_the_channel(
    redis_server: RedisServer, brokers
) -> None:  # type: ignore[no-untyped-def]
    """A long-poll waiting with a cursor of the old epoch is answered with a
    resync as soon as the new epoch is seen, not left waiting for its timeout."""
    import redis

    a, b = brokers
    a.hub("room").publish({"old": 0})
    hub = b.hub("room")
    first = Reader(hub)
    a.hub("room").publish({"old": 1})
    first.wait(1)
    answered: list[object] = []
    got = threading.Event()
    assert hub.poll(hub.cursor, lambda batch: (answered.append(batch), got.set())) is None
    keys = redis.Redis.from_url(redis_server.url)
    keys.delete(*keys.keys("*room*"))  # Redis lost the channel
    keys.close()
    restarted = a.hub("room").publish({"new": 0})
    assert got.wait(10)
    (batch,) = answered
    assert batch.resync and batch.reason == "from another epoch"  # type: ignore[attr-defined]
    # Its cursor is the new epoch's start: the next poll gets its first message.
    epoch, _, seq = restarted.id.rpartition("-")
    assert seq == "1" and batch.cursor == f"{epoch}-0"  # type: ignore[attr-defined]
    assert [m.id for m in hub.since(batch.cursor).messages] == [restarted.id]  # type: ignore[attr-defined]
    first.close()


def test_a_subscriber_arriving_while_its_channel_is_let_go_keeps_the_hub_followed(
    brokers,
) -> None:  # type: ignore[no-untyped-def]
    """The receiver unfollows a channel whose users left after the linger. A
    request that subscribes just then must keep its hub held: a hub collected
    while its channel is still followed would be replaced by a fresh one that
    nobody fills, and its subscribers would hang."""
    a, b = brokers
    first = Reader(b.hub("room"))
    wait_for(lambda: b.stats()["channels"] == 1)
    first.close()
    del first
    boxes: list[Reader] = []
    let_go = b._let_go

    def racing_let_go(name: str) -> None:
        if name == "room" and not boxes:
            boxes.append(Reader(b.hub("room")))  # subscribes just before the hub is let go
        let_go(name)

    b._let_go = racing_let_go  # type: ignore[method-assign]
    wait_for(lambda: bool(boxes))
    racer = boxes.pop()
    sent = a.hub("room").publish({"n": 1})
    assert racer.wait(1)[-1]["id"] == sent.id
    b.linger = 60.0  # the channel stays followed after its last user leaves
    racer.close()
    del racer
    gc.collect()
    fresh = Reader(b.hub("room"))
    again = a.hub("room").publish({"n": 2})
    assert fresh.wait(1, timeout=5)[-1]["id"] == again.id
    fresh.close()


def test_a_fresh_hub_for_a_channel_still_followed_is_filled(brokers) -> None:  # type: ignore[no-untyped-def]
    """Whatever let a followed channel's hub be collected, the hub made afresh
    for it is read from Redis: no subscribe confirmation will come to fill it,
    and without a read its subscribers would wait forever."""
    a, b = brokers
    b.linger = 60.0  # the channel stays followed after its last user leaves
    first = Reader(b.hub("room"))
    wait_for(lambda: b.stats()["channels"] == 1)
    first.close()
    del first
    b._let_go("room")  # nobody uses it now: the hub is let go while followed
    # Collected once the reader's thread has let go of its body (and the
    # body its subscription, which holds the hub).
    wait_for(lambda: gc.collect() >= 0 and len(b._hubs) == 0)
    assert b.stats()["channels"] == 1
    sent = a.hub("room").publish({"n": 1})
    fresh = Reader(b.hub("room"), last_event_id=sent.id)
    again = a.hub("room").publish({"n": 2})
    assert fresh.wait(1, timeout=5)[-1]["id"] == again.id
    fresh.close()


def test_a_gap_trimmed_faster_than_it_is_read_ends_in_a_resync(
    redis_server: RedisServer, brokers, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A publisher trimming the stream faster than the receiver reads a gap
    (each page finds its first entry gone) does not hold the receiver: after
    reading ``_MAX_GAP`` entries in all it resyncs the subscribers with the
    latest history and goes on."""
    import wsgi_detach._broker as broker_module

    monkeypatch.setattr(broker_module, "_PAGE", 2)
    monkeypatch.setattr(broker_module, "_MAX_GAP", 10)
    a, b = brokers
    reader = Reader(b.hub("room"))
    wait_for(lambda: b.stats()["connected"])
    a.hub("room").publish("m0")
    reader.wait(1)
    link = b._link()
    read = link.read
    pages: list[int] = []

    def racing_read(channel, after, count):  # type: ignore[no-untyped-def]
        receiver = threading.current_thread() is not threading.main_thread()
        if receiver and after is not None and len(pages) < 100:
            pages.append(after)
            # Ahead by more than a page per round trip, and the entry
            # the page would start with trimmed away.
            a.hub("room").publish_many(["v", "w", "x", "y", "z"])
            redis_server.command("XDEL", "wsgi_detach:{room}:log", f"{after + 1}-0")
        return read(channel, after, count)

    link.read = racing_read  # type: ignore[method-assign]
    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")  # a gap to read
    wait_for(lambda: any(line["event"] == "resync" for line in reader.lines))
    assert len(pages) < 10  # ten entries read, two a page, then the resync
    resync = next(line for line in reader.lines if line["event"] == "resync")
    assert resync["data"]["reason"] == "older than the history"  # type: ignore[index]
    link.read = read  # type: ignore[method-assign]
    marker = a.hub("room").publish("after")
    wait_for(lambda: reader.lines[-1]["id"] == marker.id)
    reader.close()
