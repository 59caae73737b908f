"""A worker process's unacknowledged messages are named on the broker (stage_a.held), so a reclaimer restores
them at once when that process dies, instead of kombu's restore after the visibility timeout.

Messages here are delivered by kombu's own Redis consumer and left unacknowledged, as a worker's prefetched
buffer is; the holder "dies" by its alive key expiring (a short TTL, waited for on the key itself)."""

from __future__ import annotations

import json
import time
from typing import Any

from support.farm import RedisServer, wait_for

from stage_a.held import HeldMessages, alive_key, registry_key, tags_key
from stage_a.queue import TaskQueue, direct_queue
from stage_a.settings import Settings

QUEUE = "stage_a_held_test"
ROUTED = f"{QUEUE}.m-0123456789abcdef01234567"


def _deliver(tq: TaskQueue, n: int) -> tuple[Any, list[Any]]:
    """Send ``n`` messages to the routed queue and take them with kombu's consumer, unacknowledged."""
    tq.send(({"v": 2, "store": "s", "run_id": 1, "keys": [[i, 1]]} for i in range(n)), ROUTED)
    conn, got = _take(tq, n)
    assert len(got) == n
    return conn, got


def _take(tq: TaskQueue, n: int) -> tuple[Any, list[Any]]:
    """Up to ``n`` messages of the routed queue, taken with kombu's consumer and left unacknowledged."""
    conn = tq.app.connection_for_read()
    got: list[Any] = []
    consumer = conn.Consumer(direct_queue(ROUTED), callbacks=[lambda body, message: got.append(message)],
                             accept=["json"])
    consumer.qos(prefetch_count=n)
    with consumer:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            conn.drain_events(timeout=1)
    return conn, got


def _keys_of(payload_raw: bytes) -> list[Any]:
    import base64

    envelope = json.loads(payload_raw)
    return json.loads(base64.b64decode(envelope["body"]))[0][0]["keys"]


def test_a_dead_holders_unacknowledged_messages_are_restored_once(redis: RedisServer) -> None:
    tq = TaskQueue(Settings(broker_url=redis.url, queue=QUEUE))
    client = redis.client()
    conn, messages = _deliver(tq, 5)
    assert client.llen(ROUTED) == 0 and client.hlen("unacked") == 5
    dead = HeldMessages(QUEUE, "w1@host:100", ttl=1.0)
    alive = HeldMessages(QUEUE, "w2@host:200", ttl=60.0)
    for m in messages[:3]:
        dead.received(client, m.delivery_tag)
    alive.received(client, messages[3].delivery_tag)  # messages[4] is named by no one: left to kombu
    messages[0].ack()  # acknowledged before its holder died: never restored
    dead.beat(client, [])
    assert tq.restore_dead_holders() == 0  # everyone alive: nothing moves
    wait_for(lambda: not client.exists(alive_key(QUEUE, "w1@host:100")), 10, "the dead holder's key to expire")

    assert tq.restore_dead_holders() == 2
    restored = [_keys_of(raw) for raw in client.lrange(ROUTED, 0, -1)]
    assert sorted(restored) == [[[1, 1]], [[2, 1]]]
    assert client.hlen("unacked") == 2  # the live holder's and the unnamed one stay delivered
    assert not client.exists(tags_key(QUEUE, "w1@host:100"))
    assert {m.decode() for m in client.smembers(registry_key(QUEUE))} == {"w2@host:200"}
    assert tq.restore_dead_holders() == 0 and client.llen(ROUTED) == 2  # never twice
    conn.release()


def test_a_live_holder_forgets_what_it_acknowledged(redis: RedisServer) -> None:
    tq = TaskQueue(Settings(broker_url=redis.url, queue=QUEUE))
    client = redis.client()
    conn, messages = _deliver(tq, 2)
    held = HeldMessages(QUEUE, "w3@host:300", ttl=30.0)
    for m in messages:
        held.received(client, m.delivery_tag)
    messages[1].ack()
    held.beat(client, [messages[1].delivery_tag])
    assert {t.decode() for t in client.smembers(tags_key(QUEUE, "w3@host:300"))} == {messages[0].delivery_tag}
    assert 0 < client.pttl(alive_key(QUEUE, "w3@host:300")) <= 30_000
    conn.release()


def test_an_unreadable_held_entry_is_left_to_kombu_and_the_rest_restored(redis: RedisServer) -> None:
    tq = TaskQueue(Settings(broker_url=redis.url, queue=QUEUE))
    client = redis.client()
    conn, messages = _deliver(tq, 2)
    client.hset("unacked", "garbled-tag", "not json")
    dead = HeldMessages(QUEUE, "w4@host:400", ttl=1.0)
    dead.received(client, "garbled-tag")
    dead.received(client, messages[0].delivery_tag)
    client.delete(alive_key(QUEUE, "w4@host:400"))  # died
    assert tq.restore_dead_holders() == 1
    assert [_keys_of(raw) for raw in client.lrange(ROUTED, 0, -1)] == [[[0, 1]]]
    assert client.hexists("unacked", "garbled-tag")  # kombu's own restore decides about it
    conn.release()


def test_a_message_put_back_and_taken_by_another_holder_is_not_restored(redis: RedisServer) -> None:
    """kombu keeps a message's delivery tag when it puts it back (a holder's channel closing: shutdown or
    reconnect); the next holder's copy is never restored on behalf of the first, nor by a second reclaimer."""
    tq = TaskQueue(Settings(broker_url=redis.url, queue=QUEUE))
    client = redis.client()
    conn_a, (first,) = _deliver(tq, 1)
    tag = first.delivery_tag
    HeldMessages(QUEUE, "a@host:1", ttl=60.0).received(client, tag)
    conn_a.release()  # A's channel closes: kombu puts the message back, same tag
    assert client.llen(ROUTED) == 1 and client.hlen("unacked") == 0
    conn_b, (again,) = _take(tq, 1)
    assert again.delivery_tag == tag and client.hlen("unacked") == 1
    HeldMessages(QUEUE, "b@host:2", ttl=60.0).received(client, tag)
    client.delete(alive_key(QUEUE, "a@host:1"))  # A is gone; B is alive and holds the message
    assert tq.restore_dead_holders() == 0
    assert client.llen(ROUTED) == 0 and client.hlen("unacked") == 1
    assert not client.sismember(registry_key(QUEUE), "a@host:1")  # claimed: a second reclaimer skips it
    assert tq.restore_dead_holders() == 0
    conn_b.release()
