"""The Events one reconcile posts: at most one per (type, reason), listing every target.

A reconcile notes what it did per target (a ConfigMap updated, a Deployment restarted);
`aggregate` turns those notes into the Events to post. Posting one per target cost about
two API writes per Deployment on a cold start (10,000 of 21,000 writes at 5,000
Deployments), and `kubectl describe pbud` drowned in them. A single note reads as it
always did; several read as one list under a heading, cut to fit an Event's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The API server's limit on an Event's message (core/v1 `message`, events.k8s.io `note`),
# in bytes: a message is cut to fit it in UTF-8, not in characters.
MESSAGE_LIMIT = 1024
SEPARATOR = "; "
ELLIPSIS = "..."


@dataclass(frozen=True)
class PendingEvent:
    """One thing a reconcile wants to tell, about one target or the budget as a whole.

    `message` is how it reads when it is the only one of its (type, reason); `entry` how
    it reads in a list under `heading` (both default to `message` / the reason)."""

    type: str  # "Normal" | "Warning"
    reason: str  # CamelCase, what users and `kubectl get events --field-selector` match on
    message: str
    subject: str = ""  # the target it is about ("" for the budget itself)
    heading: str = ""
    entry: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.reason)

    @property
    def listed(self) -> str:
        return self.entry or self.message


@dataclass(frozen=True)
class EventToPost:
    type: str
    reason: str
    message: str
    subjects: tuple[str, ...]  # the targets it covers, in the order they were noted
    listed: int  # how many of them its message names; the rest are "and N more"


def aggregate(pending: Sequence[PendingEvent], limit: int = MESSAGE_LIMIT) -> list[EventToPost]:
    """One Event per (type, reason), in the order each was first noted; its message is the
    note's own when alone, else `heading (n): entry; entry; ...; and N more`."""
    groups: dict[tuple[str, str], list[PendingEvent]] = {}
    for event in pending:
        groups.setdefault(event.key, []).append(event)
    return [_one(group, limit) for group in groups.values()]


def _one(group: Sequence[PendingEvent], limit: int) -> EventToPost:
    first = group[0]
    subjects = tuple(e.subject for e in group)
    if len(group) == 1:
        return EventToPost(first.type, first.reason, _cut(first.message, limit), subjects, 1)
    heading = f"{first.heading or first.reason} ({len(group)}): "
    shown: list[str] = []
    for index, event in enumerate(group):
        rest = len(group) - index - 1
        tail = f"{SEPARATOR}and {rest} more" if rest else ""
        candidate = heading + SEPARATOR.join([*shown, event.listed]) + tail
        if _size(candidate) > limit:
            break
        shown.append(event.listed)
    if not shown:  # even the first entry does not fit beside the tail: cut it
        tail = f"{SEPARATOR}and {len(group) - 1} more"
        room = limit - _size(heading) - _size(tail)
        shown.append(_cut(group[0].listed, max(0, room)))
    hidden = len(group) - len(shown)
    message = heading + SEPARATOR.join(shown) + (f"{SEPARATOR}and {hidden} more" if hidden else "")
    return EventToPost(first.type, first.reason, _cut(message, limit), subjects, len(shown))


def _size(text: str) -> int:
    return len(text.encode())


def _cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` bytes, else as much as fits followed by '...'."""
    if _size(text) <= limit:
        return text
    room = max(0, limit - len(ELLIPSIS))
    return text.encode()[:room].decode(errors="ignore") + ELLIPSIS[: limit - room]
