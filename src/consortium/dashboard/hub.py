"""Fan-out of live updates from the ingest thread to the page's Server-Sent Event streams.

The ingest writer thread calls :meth:`EventHub.publish` after each committed
batch; every connected stream has its own bounded :class:`asyncio.Queue` on the
server's event loop and receives only the items its user may see (its
institution's, or all for an operator).  A stream whose client cannot keep up
is closed rather than allowed to grow without bound: the browser reconnects
with ``Last-Event-ID`` and the server replays the missed alerts from the store,
so a slow client loses nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubEvent:
    """One Server-Sent Event: a ``kind`` (``alerts``, ``fleet``, ``events``, ``traffic``, ``store``) and its items.

    ``last_id`` is the highest alert id in an ``alerts`` event (the SSE ``id:``
    field, which the browser sends back as ``Last-Event-ID`` when it reconnects).
    """

    kind: str
    items: tuple[Mapping[str, Any], ...]
    last_id: int | None = None


@dataclass(eq=False)
class Subscription:
    """One connected stream: its queue, its loop and whose items it may see."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[HubEvent | None]
    institution: str | None
    overflowed: bool = field(default=False)


class EventHub:
    """Thread-safe publish, per-subscriber asyncio queues.

    Parameters
    ----------
    max_queue : int, default 2000
        Events buffered per subscriber before it is considered too slow and closed.
    """

    def __init__(self, *, max_queue: int = 2000) -> None:
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def subscribe(self, *, institution: str | None) -> Subscription:
        """Register a stream on the running event loop; ``institution`` None sees everything."""
        sub = Subscription(asyncio.get_running_loop(), asyncio.Queue(self._max_queue), institution)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a stream (idempotent)."""
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def subscriber_count(self) -> int:
        """How many streams are connected."""
        with self._lock:
            return len(self._subscribers)

    def publish(self, kind: str, items: Sequence[Mapping[str, Any]], *, last_id: int | None = None) -> None:
        """Send ``items`` to every stream allowed to see them; callable from any thread.

        Items carrying an ``"institution"`` key go only to operators and to that
        institution's streams; items without one go to every stream.
        """
        if not items:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            if sub.institution is None:
                visible: tuple[Mapping[str, Any], ...] = tuple(items)
            else:
                visible = tuple(i for i in items if i.get("institution", sub.institution) == sub.institution)
            if not visible:
                continue
            event = HubEvent(kind, visible, last_id)
            with contextlib.suppress(RuntimeError):  # loop already closed: the stream is gone
                sub.loop.call_soon_threadsafe(self._deliver, sub, event)

    def close(self) -> None:
        """End every stream (each receives ``None``)."""
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for sub in subscribers:
            with contextlib.suppress(RuntimeError):
                sub.loop.call_soon_threadsafe(self._end, sub)

    @staticmethod
    def _end(sub: Subscription) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)

    def _deliver(self, sub: Subscription, event: HubEvent) -> None:
        if sub.overflowed:
            return
        try:
            sub.queue.put_nowait(event)
        except asyncio.QueueFull:
            sub.overflowed = True
            logger.warning("A live stream fell %d events behind; closing it (the page reconnects)", self._max_queue)
            self.unsubscribe(sub)
            # Make room for the end marker so the stream generator wakes up and closes.
            with contextlib.suppress(asyncio.QueueEmpty):
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)
