"""Concurrent searches of the same collection and filter share one Milvus call (group commit).

Milvus spends ~3 ms of CPU per search call of 4 vectors on a 100k catalog but only ~0.35 ms per
vector in calls of 32+ vectors (measured on the bench catalog, Milvus 2.3.5), and every call
costs the service ~0.6 ms of Python. So under load, searches that arrive while one is in flight
wait for it to finish and then go out together as one call, with every vector of every waiter and
the largest limit; each waiter gets its own rows, cut to its own limit (rows are best first, so a
cut equals a search with the smaller limit). Nothing waits when nothing is in flight: a lone
request is sent at once, so batching costs no latency at low load.

The thread whose request opens a batch sends it; when it returns, the first waiter of the next
batch (if any) is woken to send that one. No thread sends more than one batch, so no request is
delayed by others' searches beyond the one in flight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from recall_service.recaller import DeadlineExceeded, SearchHits


@dataclass(eq=False)
class _Waiter:
    vectors: np.ndarray
    limit: int
    timeout_s: float
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to send the next batch rather than with a result
    result: SearchHits | None = None
    error: BaseException | None = None


class CoalescingSearch:
    def __init__(self, inner, max_vectors: int = 256):
        self.inner, self.max_vectors = inner, max_vectors
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str, int], list[_Waiter]] = {}
        self._in_flight: set[tuple[str, str, int]] = set()

    def search(self, model_version: str, vectors: np.ndarray, limit: int, expr: str, timeout_s: float) -> SearchHits:
        key = (model_version, expr, vectors.shape[1])  # a width the collection refuses fails only its own batch
        me = _Waiter(vectors, limit, timeout_s)
        with self._lock:
            self._queues.setdefault(key, []).append(me)
            leader = key not in self._in_flight
            if leader:
                self._in_flight.add(key)
        if not leader:
            if not me.woken.wait(timeout_s):
                with self._lock:
                    queue = self._queues.get(key, [])
                    if me in queue and not me.lead:  # not sent yet: leave the queue
                        queue.remove(me)
                        raise DeadlineExceeded(f"vector search did not start within {timeout_s * 1e3:.0f} ms")
                me.woken.wait()  # in the batch in flight (its call has a timeout), or chosen to send the next
            if not me.lead:
                return self._outcome(me)
        self._send(key, model_version, expr)
        return self._outcome(me)

    def _send(self, key, model_version: str, expr: str) -> None:
        with self._lock:
            queue = self._queues.get(key, [])
            batch, taken = [], 0
            while queue and (not batch or taken + len(queue[0].vectors) <= self.max_vectors):
                taken += len(queue[0].vectors)
                batch.append(queue.pop(0))
        try:
            hits = self.inner.search(model_version, np.concatenate([w.vectors for w in batch]), max(w.limit for w in batch), expr,
                                     max(w.timeout_s for w in batch))
            row = 0
            for w in batch:
                k = len(w.vectors)
                w.result = SearchHits(hits.item_ids[row:row + k, :w.limit], hits.scores[row:row + k, :w.limit], hits.raw_ids[row:row + k, :w.limit])
                row += k
        except BaseException as exc:  # every waiter of the batch gets the error, as a lone caller would
            for w in batch:
                w.error = exc
        with self._lock:
            queue = self._queues.get(key, [])
            if queue:
                queue[0].lead = True
                queue[0].woken.set()
            else:
                self._queues.pop(key, None)
                self._in_flight.discard(key)
        for w in batch:
            w.woken.set()

    @staticmethod
    def _outcome(w: _Waiter) -> SearchHits:
        if w.error is not None:
            raise w.error
        return w.result

    def ping(self) -> None:
        self.inner.ping()
