"""Messages a worker process holds (delivered, not yet acknowledged), named on the broker.

kombu's Redis transport keeps every delivered message in one `unacked` hash with no owner; when the
process that took it dies, kombu restores it only after the visibility timeout (STAGE_A_LEASE_SECONDS +
60 s). Meanwhile its images wait as pending: no lease to expire, and the queue counts as busy for orphan
recovery. So each worker names what it holds: ``<queue>.held.<holder>`` (a set of delivery tags),
``<queue>.held.<holder>.alive`` (refreshed, expiring after the holder timeout), the registry
``<queue>.held`` of holders and ``<queue>.held.owner`` (which holder received each tag last). A reclaimer restores, at once, the still-unacknowledged messages of a
holder whose alive key has expired (kombu's own restore of one tag: a message acknowledged or
restored meanwhile is not touched), and forgets that holder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


def registry_key(queue: str) -> str:
    return f"{queue}.held"


def tags_key(queue: str, holder: str) -> str:
    return f"{queue}.held.{holder}"


def alive_key(queue: str, holder: str) -> str:
    return f"{queue}.held.{holder}.alive"


def owner_key(queue: str) -> str:
    """Delivery tag -> the holder that received it last (kombu keeps a message's tag when it puts the
    message back on its queue, so a tag in an old holder's set may since have reached another holder)."""
    return f"{queue}.held.owner"


class HeldMessages:
    """One worker process's side: ``received`` names a delivery tag (with the holder alive, in one
    transaction, so a reclaimer never sees a tag of a holder that is not yet alive); ``beat`` keeps the
    holder alive and forgets the tags of acknowledged messages."""

    def __init__(self, queue: str, holder: str, ttl: float) -> None:
        self.queue, self.holder = queue, holder
        self.ttl_ms = max(1000, math.ceil(ttl * 1000))
        self._tags = tags_key(queue, holder)
        self._alive = alive_key(queue, holder)

    def received(self, client: Any, tag: str) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.set(self._alive, "1", px=self.ttl_ms)
        pipe.hset(owner_key(self.queue), tag, self.holder)
        pipe.sadd(self._tags, tag)
        pipe.sadd(registry_key(self.queue), self.holder)
        pipe.execute()

    def beat(self, client: Any, acknowledged: Iterable[str]) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.set(self._alive, "1", px=self.ttl_ms)
        done = list(acknowledged)
        if done:
            pipe.srem(self._tags, *done)
            pipe.hdel(owner_key(self.queue), *done)
        pipe.execute()

    def forget(self, client: Any) -> None:
        """Name nothing (kombu put this process's unacknowledged messages back when its channel closed:
        a reconnect, or shutdown)."""
        pipe = client.pipeline(transaction=True)
        pipe.delete(self._tags)
        pipe.srem(registry_key(self.queue), self.holder)
        pipe.execute()


def restore_dead_holders(channel: Any, queue: str) -> int:
    """Restore the unacknowledged messages of every holder of ``queue``'s registry that is no longer alive,
    through kombu's Redis ``channel``; returns how many were restored. A reclaimer claims a dead holder by
    removing it from the registry (of several reclaimers, one does), and restores only the tags that holder
    still owns."""
    client = channel.client
    restored = 0
    for raw in client.smembers(registry_key(queue)):
        holder = _text(raw)
        if client.exists(alive_key(queue, holder)) or not client.srem(registry_key(queue), holder):
            continue  # alive, or claimed by another reclaimer
        for tag in client.smembers(tags_key(queue, holder)):
            tag = _text(tag)
            owner = client.hget(owner_key(queue), tag)
            if owner is None or _text(owner) != holder or not client.hexists(channel.unacked_key, tag):
                continue  # received by another holder since, acknowledged, or restored already
            try:
                channel.qos.restore_by_tag(tag, client=client)  # WATCHes the hash: restored at most once
            except (ValueError, TypeError, KeyError) as exc:  # an entry kombu cannot read: left to kombu
                log.warning("cannot restore held message %s of %s (%s)", tag, holder, exc)
                continue
            client.hdel(owner_key(queue), tag)
            restored += 1
        client.delete(tags_key(queue, holder))
    return restored


def _text(value: Any) -> str:
    """A Redis reply as text (bytes unless the client decodes responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)
