"""The recall path as pure logic over three small interfaces, so it is tested without servers.

    InterestReader   user ids -> stored interest records (the feature store)
    ItemSearch       (model version, vectors, limit, filter) -> per-vector top items (Milvus)
    ModelSource      the current model: user tower (interests on the fly) and popular items; the
                     shape (width, K) of each installed version, which a stored record must fit
    ItemAvailability the items taken out of recall (the model registry's inactive set)

For each request: the stored record -> one search with all K_u vectors in the collection of the
record's own model version -> drop the exclusions, the window's items and the user's seen set ->
merge (max score or quota) -> top n. Inactive items are excluded twice: by the search's `active == true` (so a
search returns enough active items) and by the availability set after it (so an item is out of
every answer as soon as the service has read the set, before Milvus shows the flag). A user the
store does not know gets interests computed by the current user
tower from the request's recent items, else the current model's popular items. Outages take the
same fallbacks (documented per reason in recall.proto) unless `fallback_on_outage` is off, in
which case they raise `BackendUnavailable` (UNAVAILABLE). A backend that failed FAILURES_TO_OPEN
times in a row is skipped for a cool-down (`CircuitBreaker`), so requests during an outage answer
at once instead of each waiting for a timeout, while one slow call cannot switch a backend off
for every client. Each vector search is bounded by the request's `Deadline`; the
feature-store read by its own socket timeout ([recall].feature_store_timeout_ms: redis-py has no
per-call timeout), started only while the deadline has time left, as is each per-user re-read
after a corrupt record. An answer ready only after the deadline is DeadlineExceeded (the client
has stopped waiting: it is not counted OK).

A batch is served with one store round trip and one search per (model version, filter) group, sent
to Milvus in calls of at most MAX_HITS_PER_SEARCH hits (vectors x limit), so that the size of one
valid request never decides whether a call answers within vector_search_timeout_ms.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from infra.config import MILVUS_MAX_TOPK
from recall_service.filters import ItemFilter
from recall_service.merge import MISSING_ITEM, merge_by_quota, merge_one_by_score
from model_export.registry import NO_INACTIVE_ITEMS, InactiveItems
from recall_service.query import FallbackReason, InvalidRequest, MergePolicy, RecallPath, RecallQuery
from streaming.feature_store import InterestRecord, RecordError, SeenOnly, get_each

ACTIVE_ONLY = "active == true"  # deactivated items are never recalled, whatever the request's filter
# Hits (vectors x limit) one Milvus call asks for at most: Milvus' own cap on one query's top k (and
# on the queries of one call). A larger group (a batch of users x K_u x per_interest_n) is sent in
# several calls, each within vector_search_timeout_ms, instead of one that only times out.
MAX_HITS_PER_SEARCH = MILVUS_MAX_TOPK
# Failed calls in a row (no success between them) that open a backend's circuit breaker: one call
# that failed says little (a slow search, a blip), a run of them is an outage.
FAILURES_TO_OPEN = 3


class BackendUnavailable(RuntimeError):
    """A backend (feature store, vector search, model registry) cannot answer now."""


class SearchRejected(BackendUnavailable):
    """The vector store answered but refused this one search (a data problem, not an outage):
    the requests fall back, the circuit breaker stays closed."""


class ExpressionRejected(SearchRejected):
    """The vector store refused the search's boolean expression: the client's fault (INVALID_ARGUMENT)
    only when the request carried a filter; otherwise the service's own `active == true` was refused."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before the work was done."""


class VersionRetired(LookupError):
    """The vector collection of a model version does not exist (any more)."""


@dataclass
class SearchHits:
    """Top items per query vector, best first; rows shorter than `limit` end in padding."""

    item_ids: np.ndarray  # [M, limit] int64, MISSING_ITEM as padding
    scores: np.ndarray  # [M, limit] float32, -inf as padding
    raw_ids: np.ndarray  # [M, limit] object (str), "" as padding


class InterestReader(Protocol):
    def get_many(self, user_ids: list[str]) -> list[InterestRecord | SeenOnly | None]: ...


class ItemSearch(Protocol):
    def search(self, model_version: str, vectors: np.ndarray, limit: int, expr: str, timeout_s: float) -> SearchHits: ...


@dataclass(frozen=True)
class VersionShape:
    """What a model version's manifest says of the interests it computes: a stored record must fit it."""

    dim: int  # the width of its interest and item vectors
    n_interests: int  # K: a user has at most K interest vectors


class ServingModel(Protocol):
    version: str

    def interests(self, windows: Sequence[Sequence[str]], profiles: Sequence[Mapping[str, str] | None]) -> list[np.ndarray | None]: ...
    def popular(self, n: int, item_filter: ItemFilter | None, excluded: frozenset[str], inactive: InactiveItems) -> list[tuple[str, float]]: ...


class ModelSource(Protocol):
    def current(self) -> ServingModel | None: ...
    def current_version(self) -> str | None: ...
    def prepare(self) -> None: ...  # loads the current version ahead of requests (the server's health prober calls it)
    def shape(self, version: str) -> VersionShape | None: ...  # None: the version is not installed here


class ItemAvailability(Protocol):
    def inactive(self) -> InactiveItems: ...


class EveryItemActive:
    def inactive(self) -> InactiveItems:
        return NO_INACTIVE_ITEMS


class Deadline:
    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.expires = clock() + seconds

    def remaining(self) -> float:
        return self.expires - self.clock()

    def check(self, before: str) -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"the deadline passed before {before}")
        return left


class CircuitBreaker:
    """Closed, every caller uses the backend. `failures_to_open` failures in a row (no success
    between them) open it for `cooldown_s`: callers skip the backend and take the fallback at once.
    Then half-open: the first caller is a trial (the others keep falling back for another
    cool-down): its success closes the breaker, its failure opens it again. So a backend that hangs
    rather than refusing costs one caller's timeout per cool-down, not the timeout of every caller
    that arrives once the cool-down has passed. An answer to a call started before the last failure
    (a slow success overtaken by another caller's timeout) neither closes it nor ends the run, and
    the failure of such a call is part of that failure, not another of the run: requests whose
    searches shared one Milvus call (coalesce.py) all fail with it, and one slow call must not open
    the breaker for every client. So concurrent callers of a hanging backend open it after
    `failures_to_open` rounds of timeouts, each round the calls started after the last one failed."""

    def __init__(self, cooldown_s: float, clock=time.monotonic, failures_to_open: int = FAILURES_TO_OPEN):
        self.cooldown_s, self.clock, self.failures_to_open = cooldown_s, clock, failures_to_open
        self.open_until = 0.0  # 0 = closed
        self.failed_at = -float("inf")
        self.failures = 0  # failures since the last success
        self._lock = threading.Lock()

    def allow(self) -> bool:
        now = self.clock()
        with self._lock:
            if self.open_until == 0.0:
                return True
            if now < self.open_until:
                return False
            self.open_until = now + self.cooldown_s  # this caller is the trial; one that never reports is replaced after it
            return True

    def failed(self, started: float) -> None:
        """A call made at `started` (the breaker's clock) failed."""
        with self._lock:
            if started < self.failed_at:  # under way when the last failure was counted: the same incident
                return
            self.failed_at = self.clock()
            self.failures += 1
            if self.failures >= self.failures_to_open:  # a failed trial too: the run has not ended since it opened
                self.open_until = self.failed_at + self.cooldown_s

    def succeeded(self, started: float) -> None:
        """The backend answered a call made at `started` (the breaker's clock)."""
        with self._lock:
            if started >= self.failed_at:
                self.open_until = 0.0
                self.failures = 0


@dataclass
class RecallResult:
    items: list[tuple[str, float, int]]  # (raw item id, score, interest index or -1)
    model_version: str
    path: RecallPath
    reason: FallbackReason
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds


@dataclass
class _Pending:
    """A request on its way through the paths."""

    index: int
    query: RecallQuery
    stages: dict[str, float]
    record: InterestRecord | None = None
    reason: FallbackReason = FallbackReason.NONE
    window: tuple[str, ...] = ()  # the stored window or the request's recent items: what the user tower reads
    seen: frozenset[str] = frozenset()  # the stored seen set
    profile: Mapping[str, str] | None = None  # the stored profile, read by the user tower with the stored window
    vectors: np.ndarray | None = None

    def left_out(self) -> frozenset[str]:
        return self.query.left_out(self.window, self.seen)


@dataclass
class _SearchOutage:
    """What one request's failed vector search said ("" while none failed)."""

    detail: str = ""


class Recaller:
    def __init__(self, reader: InterestReader, search: ItemSearch, models: ModelSource, *, availability: ItemAvailability = EveryItemActive(),
                 search_timeout_s: float = 0.5, max_per_interest_n: int = 2000, fallback_on_outage: bool = True, cooldown_s: float = 1.0,
                 clock=time.monotonic):
        self.reader, self.search, self.models, self.availability = reader, search, models, availability
        self.search_timeout_s, self.max_per_interest_n, self.fallback_on_outage = search_timeout_s, max_per_interest_n, fallback_on_outage
        self.clock = clock
        self.store_breaker = CircuitBreaker(cooldown_s, clock)
        self.search_breaker = CircuitBreaker(cooldown_s, clock)
        # model version -> the width of its vectors as its collection accepted them, for a version not
        # installed here (an installed one's shape comes from its manifest): a stored record of another
        # width is corrupt (it would fail the search of its whole group). One entry per version searched.
        self.searched_dims: dict[str, int] = {}

    def recall_many(self, queries: Sequence[RecallQuery], deadline: Deadline) -> list[RecallResult]:
        if not queries:  # no store read: nothing to tell a circuit breaker's trial about the store
            return []
        pending = [_Pending(i, q, {}) for i, q in enumerate(queries)]
        results: list[RecallResult | None] = [None] * len(queries)
        inactive = self.availability.inactive()
        outage = _SearchOutage()
        self._read_interests(pending, deadline)
        stored = [p for p in pending if p.record is not None]
        for p in pending:
            if p.record is None:
                p.window = p.query.recent_items
        on_the_fly = [p for p in pending if p.record is None and p.query.recent_items]
        popular = [p for p in pending if p.record is None and not p.query.recent_items]

        for p in stored:
            p.vectors, p.window, p.seen, p.profile = p.record.interests, p.record.window, p.record.seen, p.record.profile
        for group in self._groups(stored, lambda p: p.record.model_version):
            self._search_and_merge(group, group[0].record.model_version, RecallPath.STORED_INTERESTS, deadline, inactive, results, on_the_fly,
                                   popular, outage)

        # No backend call bounds the user tower or the popular items: the deadline is checked before
        # each, and before answering (a search that returned, a store read, may have used it up).
        if on_the_fly:
            deadline.check("the user tower")
            model = self._current_model()
            started = self.clock()
            vectors = model.interests([p.window for p in on_the_fly], [p.profile for p in on_the_fly])
            self._attribute(on_the_fly, "user_tower", self.clock() - started)
            computed = []
            for p, v in zip(on_the_fly, vectors):
                if v is None:
                    p.reason = FallbackReason.NO_KNOWN_RECENT_ITEMS
                    popular.append(p)
                else:
                    p.vectors = v
                    computed.append(p)
            for group in self._groups(computed, lambda p: model.version):
                self._search_and_merge(group, model.version, RecallPath.COMPUTED_ON_THE_FLY, deadline, inactive, results, None, popular, outage)

        if popular:
            deadline.check("the popular items")
            model = self._current_model()
            for p in popular:
                started = self.clock()
                ranked = model.popular(p.query.n, p.query.item_filter, p.left_out(), inactive)
                p.stages["merge"] = p.stages.get("merge", 0.0) + self.clock() - started
                results[p.index] = RecallResult([(raw, score, -1) for raw, score in ranked], model.version, RecallPath.POPULAR_FALLBACK, p.reason, p.stages)
        deadline.check("answering")
        return results  # type: ignore[return-value]

    # -- stages ---------------------------------------------------------------------------------

    def _read_interests(self, pending: list[_Pending], deadline: Deadline) -> None:
        # the deadline first: a request out of time that took a half-open breaker's trial would never
        # report it, and every request would fall back for another cool-down
        deadline.check("the feature store read")
        if not self.store_breaker.allow():
            self._fall_back(pending, FallbackReason.FEATURE_STORE_UNAVAILABLE, "the feature store failed recently; retrying after the cool-down")
            return
        started = self.clock()
        try:
            records = get_each(self.reader, [p.query.user_id for p in pending],  # one corrupt record must not fail the others
                               lambda: deadline.check("the feature store read"))
        except BackendUnavailable as exc:
            self.store_breaker.failed(started)
            self._attribute(pending, "feature_store", self.clock() - started)
            self._fall_back(pending, FallbackReason.FEATURE_STORE_UNAVAILABLE, str(exc))
            return
        self.store_breaker.succeeded(started)
        self._attribute(pending, "feature_store", self.clock() - started)
        for p, record in zip(pending, records):
            if isinstance(record, RecordError):  # its seen set, read beside it, still keeps what the user saw out
                record, p.reason, p.seen = None, FallbackReason.CORRUPT_RECORD, record.seen
            elif isinstance(record, SeenOnly):  # an unknown user who saw items all the same: those stay out
                record, p.seen = None, record.seen
            elif record is not None:
                shape = self.models.shape(record.model_version)
                try:
                    check_record(record, shape.dim if shape else self.searched_dims.get(record.model_version), shape.n_interests if shape else None)
                except RecordError:
                    # its window and seen set are readable: what the user saw stays out of the fallback's answer
                    record, p.reason, p.seen = None, FallbackReason.CORRUPT_RECORD, record.seen.union(record.window)
            p.record = record
            if record is None and p.reason is FallbackReason.NONE:
                p.reason = FallbackReason.UNKNOWN_USER

    def _fall_back(self, pending: list[_Pending], reason: FallbackReason, detail: str, then: list | None = None) -> None:
        """An outage of a backend: `pending` take the fallback path with `reason` (appended to `then`),
        or the request fails UNAVAILABLE when fallback_on_outage is off."""
        if not self.fallback_on_outage:
            raise BackendUnavailable(f"{reason.name.lower().replace('_', ' ')}: {detail}")
        for p in pending:
            p.reason = reason
        if then is not None:
            then.extend(pending)

    def _search_and_merge(self, group: list[_Pending], version: str, path: RecallPath, deadline: Deadline, inactive: InactiveItems,
                          results: list, retired_to: list | None, popular: list, outage: "_SearchOutage") -> None:
        """One search for the whole group (all K_u vectors of all its users, in calls of at most
        MAX_HITS_PER_SEARCH hits), then a merge per user. After a failed search the request's other
        groups fall back without one (`outage`): a batch of many groups (filters, model versions)
        counts one failure against the breaker, as one request, and does not wait out a timeout per group."""
        item_filter = group[0].query.item_filter
        expr = ACTIVE_ONLY if item_filter is None else f"{ACTIVE_ONLY} and ({item_filter.milvus_expr})"
        left_out = [p.left_out() for p in group]
        limits = [p.query.per_interest_limit(excluded, self.max_per_interest_n) for p, excluded in zip(group, left_out)]
        if outage.detail:
            return self._fall_back(group, FallbackReason.VECTOR_SEARCH_UNAVAILABLE, outage.detail, popular)
        deadline.check("the vector search")  # before the breaker, as the feature store read: a trial must report
        if not self.search_breaker.allow():
            return self._fall_back(group, FallbackReason.VECTOR_SEARCH_UNAVAILABLE,
                                   "the vector search failed recently; retrying after the cool-down", popular)
        started = self.clock()
        try:
            hits = self._search_in_calls(version, np.concatenate([p.vectors for p in group]), max(limits), expr, deadline)
        except VersionRetired:
            self.search_breaker.succeeded(started)  # Milvus answered
            if retired_to is None:  # the current model has no collection: nothing to search
                return self._fall_back(group, FallbackReason.VECTOR_SEARCH_UNAVAILABLE,
                                       f"the collection of the current model {version} is missing", popular)
            for p in group:  # recompute from the stored window and profile with the current model
                p.reason, p.record = FallbackReason.STORED_VERSION_RETIRED, None
                retired_to.append(p)
            return
        except BackendUnavailable as exc:
            if isinstance(exc, SearchRejected):
                self.search_breaker.succeeded(started)  # Milvus answered: one bad search says nothing about it
                if isinstance(exc, ExpressionRejected) and item_filter is not None:
                    raise InvalidRequest(f"filter: the vector store rejected it: {exc}", tuple(p.index for p in group)) from None
            else:
                self.search_breaker.failed(started)
                outage.detail = str(exc)
            self._attribute(group, "vector_search", self.clock() - started)
            return self._fall_back(group, FallbackReason.VECTOR_SEARCH_UNAVAILABLE, str(exc), popular)
        self.search_breaker.succeeded(started)
        self.searched_dims[version] = group[0].vectors.shape[1]
        self._attribute(group, "vector_search", self.clock() - started)

        row = 0
        for p, limit, excluded in zip(group, limits, left_out):
            deadline.check("merging a user's candidates")  # a batch's merges (a quota merge of deep lists) can outlast it
            started = self.clock()
            k = len(p.vectors)
            items = _merge_one(hits, row, k, limit, p.query, excluded, inactive.items)
            row += k
            p.stages["merge"] = p.stages.get("merge", 0.0) + self.clock() - started
            results[p.index] = RecallResult(items, version, path, p.reason, p.stages)

    def _search_in_calls(self, version: str, vectors: np.ndarray, limit: int, expr: str, deadline: Deadline) -> SearchHits:
        """The search of `vectors` as calls of at most MAX_HITS_PER_SEARCH hits, one after another, each
        capped at search_timeout_s and at the request's time left; the first failure ends it. A call
        that runs out of its cap is BackendUnavailable (Milvus is too slow now); one that runs out of
        the request's time left is the request's DeadlineExceeded, which says nothing of Milvus."""
        rows = max(1, MAX_HITS_PER_SEARCH // limit)
        calls = []
        for first in range(0, len(vectors), rows):
            timeout = min(self.search_timeout_s, deadline.check("the vector search"))
            try:
                calls.append(self.search.search(version, vectors[first:first + rows], limit, expr, timeout))
            except DeadlineExceeded as exc:
                if timeout < self.search_timeout_s or deadline.remaining() <= 0:
                    raise
                raise BackendUnavailable(f"{exc} ([recall].vector_search_timeout_ms)") from None
        if len(calls) == 1:
            return calls[0]
        return SearchHits(*(np.concatenate([getattr(hits, name) for hits in calls]) for name in ("item_ids", "scores", "raw_ids")))

    def _current_model(self) -> ServingModel:
        model = self.models.current()
        if model is None:
            raise BackendUnavailable("no model is published: run `python -m model_export publish --export-dir DIR`")
        return model

    @staticmethod
    def _groups(pending: list[_Pending], version_of) -> list[list[_Pending]]:
        """Requests that can share one search: same model version, vector width and filter. (A width
        other than the version's is refused by the search: it must fail only its own requests.)"""
        groups: dict[tuple, list[_Pending]] = defaultdict(list)
        for p in pending:
            groups[(version_of(p), p.vectors.shape[1], p.query.item_filter.milvus_expr if p.query.item_filter else "")].append(p)
        return list(groups.values())

    @staticmethod
    def _attribute(pending: list[_Pending], stage: str, seconds: float) -> None:
        for p in pending:  # a shared stage counts fully for every request in it
            p.stages[stage] = p.stages.get(stage, 0.0) + seconds


def check_record(record: InterestRecord, dim: int | None, n_interests: int | None) -> None:
    """What recall relies on in a stored record beyond what decoding it checks (the record's own
    shape, window and profile): finite interest vectors (a NaN scores nothing: an empty answer that
    looks like a success), of its model version's width and at most its K of them, when known (K_u
    vectors go to Milvus: a record of 20,000 would be a search of 20,000 queries). Raises
    RecordError: the user is answered as one with a corrupt record, nobody else is touched. (The
    window is not held to the tower's maxlen: the job keeps [streaming].window_length behaviours,
    50 by default, and the tower reads the newest maxlen of them.)"""
    if dim is not None and record.interests.shape[1] != dim:
        raise RecordError(f"user {record.user_id}: interests of width {record.interests.shape[1]}, model version {record.model_version} has {dim}")
    if n_interests is not None and record.k > n_interests:
        raise RecordError(f"user {record.user_id}: {record.k} interests, model version {record.model_version} has K = {n_interests}")
    if not np.isfinite(record.interests).all():
        raise RecordError(f"user {record.user_id}: interests with NaN or infinite values")


def _merge_one(hits: SearchHits, row: int, k: int, limit: int, query: RecallQuery, excluded: frozenset[str],
               inactive: frozenset[str]) -> list[tuple[str, float, int]]:
    """This user's rows of a group search -> excluded and inactive items dropped -> merged top n.
    Merged by raw id (one per item of a collection), so no id -> raw id map is built per call."""
    raw, scores = hits.raw_ids[row:row + k, :limit], hits.scores[row:row + k, :limit]
    if query.merge_policy is MergePolicy.QUOTA:
        ids = hits.item_ids[row:row + k, :limit]
        skip = np.fromiter((r in excluded or r in inactive for r in raw.ravel().tolist()), dtype=bool, count=raw.size).reshape(raw.shape)
        out_ids, out_scores, out_interest = merge_by_quota(ids[None], np.where(skip, -np.inf, scores)[None], query.n)
        raw_of = dict(zip(ids.ravel().tolist(), raw.ravel().tolist()))
        return [(raw_of[i], s, j) for i, s, j in zip(out_ids[0].tolist(), out_scores[0].tolist(), out_interest[0].tolist()) if i != MISSING_ITEM]
    return merge_one_by_score(raw, scores, query.n, (excluded, inactive))
