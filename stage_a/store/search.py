"""Text search over a run's images: what a search matches, and what PostgreSQL's trigram indexes are asked.

An image matches a text when its group id contains it, or, once the image has a result, when its summary,
error or path does. An image still waiting for its result is found by its group id only: its path is all
the text it has, and finding a fragment of every waiting path would read the whole unfinished part of a run
(a nightly run is mostly unfinished while it is watched). Its file name usually begins with the group id.
The test is the same wherever it runs (``text_match``): over a window of groups read in order, on a page's
rows, and as the recheck of an index's candidates, so a page never depends on which of them found a group.

Beyond the window, two trigram indexes (pg_trgm) give the candidates: ix_images_search over finished rows'
summary, error and path (revision 0006), ix_groups_search over group ids (revision 0009). A trigram index
reads every posting list the pattern names, and in a run every path shares its mission and folders and
every group id its prefix and date: a whole group id asked whole read ~100,000 index pages at ten million
images. So an index is asked only for the words of the text that are rare in a sample of the run
(SEARCH_SAMPLE groups spread over it), each cut around its trigrams that half the sample holds (the date
inside a group number): any part of the text finds a superset of its matches, and the recheck with the
whole text keeps the answer exact; a text with no rare word is asked whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy import and_, func, literal_column, or_, select, text

from stage_a.store.models import DONE, FAILED, GroupRow, ImageRow

SEARCH_SAMPLE = 100
"""Groups, spread evenly over a run, whose texts say which words of a search are common in it."""
COMMON_IN = 3
"""A word found in this many of the sampled groups (3%) is common: its posting lists are long."""
MIN_WORD = 3
"""Characters a word needs to give the trigram index a whole trigram."""
MAX_ASKED = 16
"""Parts of a text an index is asked for at most (a pasted paragraph): any of them keeps the answer exact."""
UNIVERSAL = 0.5
"""A trigram in this share of the sample is not asked (when two others of its word are): its posting list
holds half the run, and it can remove at most half the candidates the others leave."""

FINISHED_ROW = text("images.status IN ('done', 'failed')")
"""ix_images_search's predicate, written as the index says it (so the planner sees it implied)."""


def like_pattern(text_: str) -> str:
    """The LIKE pattern (ESCAPE '\\') that finds ``text_`` anywhere; NUL as the U+FFFD stored in its place."""
    escaped = text_.replace("\x00", "\ufffd").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_text() -> Any:
    """Summary, error and path in one expression, the one that ix_images_search covers (revision 0006's
    SEARCH_TEXT, built the same way)."""
    blank: Any = literal_column("''")
    space: Any = literal_column("' '")
    return (func.coalesce(ImageRow.summary, blank).concat(space).concat(func.coalesce(ImageRow.error, blank))
            .concat(space).concat(ImageRow.rel_path))


def row_match(pattern: str) -> Any:
    """A finished image's own text holds the pattern (one column holds it whole)."""
    return and_(FINISHED_ROW, or_(ImageRow.summary.like(pattern, escape="\\"),
                                  ImageRow.error.like(pattern, escape="\\"),
                                  ImageRow.rel_path.like(pattern, escape="\\")))


def text_match(pattern: str) -> Any:
    """What a search matches (the module's rule); the image's group is joined."""
    return or_(row_match(pattern), GroupRow.group_id.like(pattern, escape="\\"))


def words(text_: str) -> list[str]:
    """The runs of letters and digits in ``text_`` long enough to give a trigram (pg_trgm's words), once each."""
    found: dict[str, None] = {}
    start = 0
    for i, ch in enumerate(text_ + " "):
        if not ch.isalnum():
            if i - start >= MIN_WORD:
                found[text_[start:i]] = None
            start = i + 1
    return list(found)


def index_parts(word: str, sample: list[str]) -> list[str]:
    """The parts of ``word`` to ask a trigram index for: the word cut around its trigrams that at least
    UNIVERSAL of the (lowercased) ``sample`` holds, when two others remain; else the whole word."""
    # Positions in the word itself (lowercasing may change a length: "İ" becomes two characters).
    trigrams = [word[i:i + 3].lower() for i in range(len(word) - 2)]
    universal = [sum(t3 in t for t in sample) >= UNIVERSAL * len(sample) for t3 in trigrams]
    if not sample or not any(universal) or universal.count(False) < 2:
        return [word]
    parts: list[str] = []
    start: int | None = None
    for i, common in enumerate([*universal, True]):  # a sentinel closes the last run
        if not common and start is None:
            start = i
        elif common and start is not None:
            parts.append(word[start:i + 2])  # trigrams start..i-1 span characters start..i+1
            start = None
    return parts


@dataclass(frozen=True)
class RareWords:
    """The parts of a search's rare words to ask each trigram index for (empty: ask for the whole text)."""

    images: tuple[str, ...]
    groups: tuple[str, ...]


def rare_words(c: Any, run_id: int, text_: str, last: int) -> RareWords:
    """The words of ``text_`` found in fewer than COMMON_IN of SEARCH_SAMPLE groups spread over the run (its
    positions 0..``last``): in finished rows' text (for ix_images_search) and in group ids (for
    ix_groups_search). One bounded read: the first image of each sampled group, by the primary keys."""
    candidates = words(text_)
    if not candidates:
        return RareWords((), ())
    positions = sorted({round(k * last / (SEARCH_SAMPLE - 1)) for k in range(SEARCH_SAMPLE)})
    rows = c.execute(
        select(GroupRow.group_id, ImageRow.status, ImageRow.summary, ImageRow.error, ImageRow.rel_path)
        .outerjoin(ImageRow, and_(ImageRow.run_id == GroupRow.run_id, ImageRow.group_position == GroupRow.position,
                                  ImageRow.image_index == 1))
        .where(GroupRow.run_id == run_id, GroupRow.position.in_(positions)).limit(SEARCH_SAMPLE)
    ).all()
    ids = [str(gid).lower() for gid, *_ in rows]
    texts = [" ".join((s or "", e or "", p or "")).lower() for _, st, s, e, p in rows if st in (DONE, FAILED)]

    def rare(sample: list[str]) -> tuple[str, ...]:
        rare_ones = (w for w in candidates if sum(w.lower() in t for t in sample) < COMMON_IN)
        return tuple(islice((part for w in rare_ones for part in index_parts(w, sample)), MAX_ASKED))

    return RareWords(rare(texts), rare(ids))


def index_conditions(pattern: str, rare: RareWords, part: str) -> list[Any]:
    """The conditions that find ``part``'s candidates by its trigram index and recheck them exactly:
    "finished", finished rows by ix_images_search; "groups", rows of groups whose id holds the text, by
    ix_groups_search (GroupRow joined)."""
    if part == "finished":
        asked = [search_text().like(f"%{w}%") for w in rare.images] or [search_text().like(pattern, escape="\\")]
        return [FINISHED_ROW, *asked, row_match(pattern)]
    asked = [GroupRow.group_id.like(f"%{w}%") for w in rare.groups] or [GroupRow.group_id.like(pattern, escape="\\")]
    # The recheck goes through an expression the index does not cover, so the planner asks the index for
    # the rare words alone and tests the whole text on the rows they find.
    return [*asked, func.concat(GroupRow.group_id, "").like(pattern, escape="\\")]
