"""Chunk messages: keys of one run, sizes that shrink at the end of a run, strict parsing, v1 still read."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from stage_a.messages import (
    CHUNK_IMAGES,
    TAIL_SHARES,
    PoisonMessage,
    chunks,
    group_payload,
    image_count,
    image_payload,
    parse_payload,
    payloads_for,
)
from stage_a.work import ImageKey, WorkItem


def keys(n: int, per_group: int = 3, run_id: int = 7) -> list[ImageKey]:
    return [ImageKey(run_id, i // per_group, i % per_group + 1) for i in range(n)]


@pytest.mark.parametrize("n", [1, 12, 153, 511, 512, 513, 5000])
def test_per_image_chunks_keep_every_key_once_in_order_and_shrink_to_one(n: int) -> None:
    got = list(chunks(keys(n), "per_image"))
    assert [k for c in got for k in c] == keys(n)
    sizes = [len(c) for c in got]
    assert max(sizes) <= CHUNK_IMAGES and sizes[-1] == 1
    assert sizes == sorted(sizes, reverse=True)  # guided self-scheduling: never growing
    left = n
    for size in sizes:  # each is 1/TAIL_SHARES of what is left, at most CHUNK_IMAGES
        assert size == max(1, min(CHUNK_IMAGES, math.ceil(left / TAIL_SHARES)))
        left -= size


@pytest.mark.parametrize(("n", "least"), [(153, 8), (5000, 8), (7, 8), (600, 32), (600, 64)])
def test_tail_chunks_are_never_smaller_than_a_model_batch_but_the_last(n: int, least: int) -> None:
    got = list(chunks(keys(n), "per_image", least=least))
    assert [k for c in got for k in c] == keys(n)
    sizes = [len(c) for c in got]
    assert max(sizes) <= CHUNK_IMAGES
    assert all(s >= min(least, CHUNK_IMAGES) for s in sizes[:-1]) and 1 <= sizes[-1] <= max(least, CHUNK_IMAGES)
    left = n
    for size in sizes[:-1]:  # 1/TAIL_SHARES of what is left, at least the batch, at most CHUNK_IMAGES
        assert size == min(CHUNK_IMAGES, max(least, math.ceil(left / TAIL_SHARES)))
        left -= size


def test_per_group_tail_chunks_take_whole_groups_up_to_a_model_batch() -> None:
    ks = keys(600, per_group=3)
    got = list(chunks(ks, "per_group", least=8))
    assert [k for c in got for k in c] == ks
    assert all(len({k.group_position for k in c}) * 3 == len(c) for c in got)  # whole groups only
    assert all(len(c) >= 8 for c in got[:-1]) and all(len(c) <= CHUNK_IMAGES for c in got)


def test_chunks_stream_holding_a_bounded_window() -> None:
    """A 10M-key stream is chunked without reading ahead more than TAIL_SHARES full chunks."""
    pulled = 0

    def stream() -> Any:
        nonlocal pulled
        for k in itertools.islice(itertools.count(), 10_000_000):
            pulled += 1
            yield ImageKey(1, k, 1)

    it = chunks(stream(), "per_image")
    first = next(it)
    assert len(first) == CHUNK_IMAGES and pulled <= TAIL_SHARES * CHUNK_IMAGES + 1


def test_per_group_chunks_are_whole_groups() -> None:
    ks = [ImageKey(7, g, i) for g in range(200) for i in range(1, 2 + g % 4)] + [ImageKey(7, 200, i) for i in range(1, 41)]
    got = list(chunks(ks, "per_group"))
    assert [k for c in got for k in c] == ks
    for c in got:
        assert len(c) <= CHUNK_IMAGES or len({k.group_position for k in c}) == 1  # a big group alone
    split = [g for g, nxt in zip(got, got[1:], strict=False) if g[-1].group_position == nxt[0].group_position]
    assert not split


def test_a_chunk_never_mixes_runs() -> None:
    ks = keys(40, run_id=1) + keys(5, run_id=2)
    got = list(chunks(ks, "per_image"))
    assert all(len({k.run_id for k in c}) == 1 for c in got)
    assert [k for c in got for k in c] == ks


def test_payloads_name_keys_not_paths_and_parse_back() -> None:
    items = [WorkItem(k, f"m/{k.group_position}/{k.image_index}.jpg") for k in keys(100)]
    payloads = list(payloads_for(items, "per_image", "s1"))
    assert all(set(p) == {"v", "store", "run_id", "keys"} and p["v"] == 2 for p in payloads)
    parsed = [parse_payload(p) for p in payloads]
    assert [k for m in parsed for k in m.keys] == [it.key for it in items]
    assert all(m.store == "s1" and m.paths is None for m in parsed)
    assert sum(image_count(p) for p in payloads) == 100


def test_version_1_payloads_still_parse_with_their_paths() -> None:
    one = WorkItem(ImageKey(3, 1, 2), "m/a.jpg")
    m = parse_payload(image_payload(one, "s"))
    assert (m.keys, m.paths) == ([one.key], ["m/a.jpg"])
    group = [WorkItem(ImageKey(3, 4, i), f"m/{i}.jpg") for i in (1, 2)]
    m = parse_payload(group_payload(group, "s"))
    assert m.keys == [it.key for it in group] and m.paths == ["m/1.jpg", "m/2.jpg"]
    legacy = {k: v for k, v in image_payload(one, "s").items() if k not in ("v", "store")}  # before versions
    assert parse_payload(legacy).keys == [one.key]


GOOD = {"v": 2, "store": "s", "run_id": 3, "keys": [[0, 1], [0, 2]]}


@pytest.mark.parametrize(("payload", "fragment"), [
    ({**GOOD, "keys": []}, "field 'keys' must be a non-empty list"),
    ({**GOOD, "keys": "0,1"}, "field 'keys' must be a non-empty list"),
    ({**GOOD, "keys": [[0, 1, 2]]}, "each entry of 'keys' must be [group_position, image_index]"),
    ({**GOOD, "keys": [{"p": 0}]}, "each entry of 'keys'"),
    ({**GOOD, "keys": [[0, -1]]}, "must be a non-negative integer, got -1"),
    ({**GOOD, "keys": [[0, True]]}, "must be a non-negative integer, got True"),
    ({**GOOD, "keys": [[2**40, 1]]}, "is out of range"),
    ({**GOOD, "keys": [[0, 1]] * 10_001}, "lists 10001 images (at most 10000)"),
    ({**GOOD, "run_id": "3"}, "field 'run_id' must be a non-negative integer"),
    ({**GOOD, "path": "/etc/passwd"}, "unknown field 'path'"),
    ({**GOOD, "v": 3}, "field 'v' must be 1 or 2, got 3"),
    ({**GOOD, "v": True}, "field 'v' must be 1 or 2, got True"),
    ({**GOOD, "store": ""}, "field 'store' must be a store id"),
])
def test_malformed_chunks_are_poison(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PoisonMessage) as err:
        parse_payload(payload)
    assert fragment in str(err.value)


def test_image_count_never_raises() -> None:
    assert image_count(GOOD) == 2 and image_count(None) == 1 and image_count({"keys": "x"}) == 1
    assert image_count({"images": [{}] * 3}) == 3 and image_count({"keys": [[0, 1]] * 20_000}) == 10_000
