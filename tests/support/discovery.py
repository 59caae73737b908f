"""Reading discovered groups the way the tests compare them."""

from __future__ import annotations

from producer.discovery import Group


def image_names(group: Group) -> list[str]:
    """The group's file names (no folders), in image order."""
    return [p.rsplit("/", 1)[-1] for p in group.images]
