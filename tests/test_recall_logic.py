"""Unit tests of the recall service's pure logic: filter grammar, request validation, the quota
merge, exclusions and the path / fallback decisions of Recaller, with in-memory fakes."""

import dataclasses
import shutil
import threading
import time
import traceback

import numpy as np
import pytest

from recall_service.filters import FilterError, parse_filter
from recall_service.merge import MISSING_ITEM, merge_by_quota, merge_by_score
from recall_service.query import FallbackReason, InvalidRequest, Limits, MergePolicy, RecallPath, validate
from recall_service.recaller import (ACTIVE_ONLY, FAILURES_TO_OPEN, MAX_HITS_PER_SEARCH, BackendUnavailable, CircuitBreaker, Deadline,
                                     DeadlineExceeded, ExpressionRejected, Recaller, SearchHits, SearchRejected, VersionRetired, VersionShape)
from model_export.registry import NO_INACTIVE_ITEMS as NO_INACTIVE, InactiveFileError, InactiveItems, ModelRegistry
from streaming.feature_store import InMemoryFeatureStore, InterestRecord, RecordError

from conftest import wait_for

# -- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, milvus, keeps, drops", [
    ('category == "a|b"', 'category == "a|b"', ("a|b", (), True), ("a", (), True)),
    ("category like 'Com%' and active == true", '(category >= "Com" and category < "Con") and active == true', ("Comedy", (), True), ("Comedy", (), False)),
    ('category like "item_g%"', '(category >= "item_g" and category < "item_h")', ("item_genre", (), True), ("itemXgenre", (), True)),
    ('category in ["x", "y"] || active != true', 'category in ["x", "y"] or active == false', ("z", (), False), ("z", (), True)),
    ('category not in ["x"]', 'not (category in ["x"])', ("y", (), True), ("x", (), True)),
    ('NOT (category != "x") AND active == TRUE', 'not ((category != "x")) and active == true', ("x", (), True), ("y", (), True)),
    ('!active == false', "not (active == false)", ("q", (), True), ("q", (), False)),
    ('category like "Drama"', 'category == "Drama"', ("Drama", (), True), ("Drama|War", (), True)),
    ("category == 'say \"hi\" \\o/'", 'category == "say \\"hi\\" \\\\o/"', ('say "hi" \\o/', (), True), ("say", (), True)),
    ('category contains "Romance"', 'array_contains(categories, "Romance")', ("Comedy|Romance", ("Comedy", "Romance"), True), ("Romance|X", ("Romance X",), True)),
    ("category contains 'a\"b' and not category contains 'c'", 'array_contains(categories, "a\\"b") and not (array_contains(categories, "c"))',
     ("", ('a"b',), True), ("", ('a"b', "c"), True)),
])
def test_filter_compiles_to_milvus_and_to_an_equivalent_predicate(text, milvus, keeps, drops):
    item_filter = parse_filter(text)
    assert item_filter.milvus_expr == milvus
    assert item_filter.matches(*keeps) and not item_filter.matches(*drops)


@pytest.mark.parametrize("text, message", [
    ('category like "%Comedy%"', "prefix pattern"),
    ('category like "Co%edy%"', "prefix pattern"),
    ("price > 3", "unexpected character '>'"),
    ('genre == "x"', "unknown field 'genre'"),
    ('category == "a" and', "expected a field"),
    ('category == "a" category', "unexpected 'category'"),
    ('category == "a"b"', "unexpected character '\"' at position 16"),
    ("active == 1", "unexpected character '1'"),
    ('active == "true"', "true or false"),
    ('category in []', "expected a quoted string"),
    ('category contains ["a"]', "expected a quoted string"),
    ('categories contains "a"', "unknown field 'categories'"),
    ("(" * 40 + "active == true" + ")" * 40, "nested deeper"),
    ('category == "a"; drop collection', "unexpected character ';'"),
    ('category == "\x01"', "control characters"),
])
def test_malformed_filters_are_refused_with_a_reason(text, message):
    with pytest.raises(FilterError, match=message):
        parse_filter(text)


def test_empty_filter_is_no_filter_and_length_is_capped():
    assert parse_filter("") is None and parse_filter("   ") is None
    with pytest.raises(FilterError, match="at most 10"):
        parse_filter("active == true", max_chars=10)


# -- validation ---------------------------------------------------------------------------------

LIMITS = Limits(max_n=100, max_per_interest_n=300, max_exclusions=3, max_recent_items=4, max_filter_chars=64, max_batch=8)


def test_a_valid_request_is_normalised():
    q = validate("u1", 10, ["a", "b"], ["x"], 'active == true', 0, 2, LIMITS)
    assert q.excluded == {"a", "b"} and q.recent_items == ("x",) and q.merge_policy is MergePolicy.QUOTA
    assert q.item_filter.milvus_expr == "active == true"
    assert validate("u1", 10, limits=LIMITS).merge_policy is MergePolicy.MAX_SCORE  # unspecified -> default


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n: 0 is out of range"),
    ({"n": -5}, "n: -5 is out of range"),
    ({"n": 101}, r"ask for 1..100"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u" * 300}, "user_id"),
    ({"user_id": "bob\nmallory"}, "user_id: .*no control characters"),  # no event can name such a user
    ({"exclude_item_ids": ["a\x00"]}, r"exclude_item_ids\[0\]: .*no control characters"),
    ({"recent_item_ids": ["ok", "b\x7f"]}, r"recent_item_ids\[1\]: .*no control characters"),
    ({"exclude_item_ids": ["a", "b", "c", "d"]}, "exclude_item_ids: 4 ids, at most 3"),
    ({"exclude_item_ids": [""]}, r"exclude_item_ids\[0\]"),
    ({"recent_item_ids": ["r"] * 5}, "recent_item_ids: 5 ids, at most 4"),
    ({"filter_text": "category ~ 1"}, "filter: unexpected character"),
    ({"filter_text": "active == true and " * 5}, "at most 64"),
    ({"per_interest_n": 301}, "per_interest_n"),
    ({"per_interest_n": -1}, "per_interest_n"),
    ({"merge_policy": 9}, "merge_policy: unknown value 9"),
])
def test_invalid_requests_name_the_field(kwargs, message):
    args = {"user_id": "u1", "n": 10, **kwargs}
    with pytest.raises(InvalidRequest, match=message):
        validate(limits=LIMITS, **args)


def test_default_per_interest_limit_covers_what_is_left_out():
    q = validate("u1", 10, ["a", "b"], limits=LIMITS)
    assert q.left_out(("b", "c"), {"c", "d"}) == frozenset("abcd")  # the exclusions, a window, a seen set
    assert q.per_interest_limit(q.left_out(("b", "c")), cap=300) == 10 + 3
    assert q.per_interest_limit(q.left_out("defghijk"), cap=15) == 15
    # a client's per_interest_n counts the candidates kept after what is left out, which it cannot see
    # (the window, the seen set): taken as is, a window of the user's 7 best left nothing
    assert validate("u1", 10, per_interest_n=7, limits=LIMITS).per_interest_limit(frozenset("z"), cap=300) == 7 + 1
    assert validate("u1", 10, per_interest_n=7, limits=LIMITS).per_interest_limit(frozenset("defghijk"), cap=12) == 12


# -- merges -------------------------------------------------------------------------------------


def test_quota_merge_takes_round_robin_by_rank_then_fills_by_score():
    ids = np.array([[[1, 2, 3, 4], [1, 5, 6, 7], [8, MISSING_ITEM, MISSING_ITEM, MISSING_ITEM]]])
    scores = np.array([[[.9, .8, .7, .6], [.95, .5, .4, .3], [.2, -np.inf, -np.inf, -np.inf]]], dtype=np.float32)
    out_ids, out_scores, out_interest = merge_by_quota(ids, scores, 7)
    # quotas 3/2/2: rank 0 -> 1 (interest 0), 5 (1 skips its taken 1), 8 (2); rank 1 -> 2, 6; interest 2 is
    # empty, so interest 0 takes its third (3) and the last slot is the best remaining by score (4: .6)
    assert out_ids[0].tolist() == [1, 5, 8, 2, 6, 3, 4]
    assert out_interest[0].tolist() == [0, 1, 2, 0, 1, 0, 0]
    np.testing.assert_allclose(out_scores[0], [.9, .5, .2, .8, .4, .7, .6])


def test_quota_merge_respects_active_interests_duplicates_and_short_rows():
    ids = np.array([[[1, 2], [1, 2]], [[3, 4], [5, 6]]])
    scores = np.array([[[.9, .8], [.9, .8]], [[.9, .8], [.7, .6]]], dtype=np.float32)
    out_ids, _, out_interest = merge_by_quota(ids, scores, 3, active_interests=np.array([[True, True], [True, False]]))
    assert out_ids[0].tolist() == [1, 2, MISSING_ITEM]  # only two distinct items exist
    assert out_ids[1].tolist() == [3, 4, MISSING_ITEM] and out_interest[1].tolist() == [0, 0, -1]


def test_quota_and_max_score_agree_with_one_interest():
    rng = np.random.default_rng(0)
    ids = rng.permutation(50)[None, None, :20] + 1
    scores = np.sort(rng.random(20).astype(np.float32))[::-1][None, None, :]
    assert merge_by_quota(ids, scores, 10)[0].tolist() == merge_by_score(ids, scores, 10)[0].tolist()


# -- the recall path with fakes -----------------------------------------------------------------

DIM = 8


class FakeSearch:
    """Exact inner-product search over per-version catalogs; records every call."""

    def __init__(self, catalogs: dict[str, np.ndarray]):
        self.catalogs = catalogs  # version -> [n_items, dim]; item i has raw id f"i{i}"
        self.calls = []
        self.failure: Exception | None = None

    def search(self, version, vectors, limit, expr, timeout_s):
        self.calls.append((version, len(vectors), limit, expr, timeout_s))
        if self.failure:
            raise self.failure
        if version not in self.catalogs:
            raise VersionRetired(version)
        scores = vectors @ self.catalogs[version].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :limit]
        raw = np.array([f"i{i}" for i in range(len(self.catalogs[version]))], dtype=object)
        return SearchHits(order + 1, np.take_along_axis(scores, order, 1).astype(np.float32), raw[order])


class FakeModel:
    def __init__(self, version, catalog, n_interests=4):
        self.version, self.catalog, self.shape = version, catalog, VersionShape(catalog.shape[1], n_interests)
        self.profiles_seen = []

    def interests(self, windows, profiles):
        self.profiles_seen.extend(profiles)
        known = [[int(r[1:]) for r in w if r.startswith("i")] for w in windows]
        return [self.catalog[k][:2].copy() if k else None for k in known]

    def popular(self, n, item_filter, excluded, inactive):
        ranked = [(f"i{i}", float(100 - i)) for i in range(len(self.catalog))]
        return [r for r in ranked if r[0] not in excluded and r[0] not in inactive.items][:n]


class FakeModels:
    def __init__(self, model):
        self.model = model

    def current(self):
        return self.model

    def current_version(self):
        return self.model.version if self.model else None

    def prepare(self):  # the model is given, never loaded
        pass

    def shape(self, version):  # only the given model's version is installed
        return self.model.shape if self.model and version == self.model.version else None


class DownStore:
    def get_many(self, user_ids):
        raise BackendUnavailable("connection refused")


@pytest.fixture
def world():
    rng = np.random.default_rng(1)
    catalogs = {"A": rng.standard_normal((40, DIM)).astype(np.float32), "B": rng.standard_normal((40, DIM)).astype(np.float32)}
    store = InMemoryFeatureStore()
    interests = rng.standard_normal((3, DIM)).astype(np.float32)
    store.put_many([InterestRecord("alice", "A", interests, ("i1", "i2"), 0, "0:0")])
    search = FakeSearch(catalogs)
    recaller = Recaller(store, search, FakeModels(FakeModel("B", catalogs["B"])), max_per_interest_n=40)
    return recaller, search, store, catalogs, interests


def exact(catalog, interests, n, excluded):
    scores = interests @ catalog.T
    best = scores.max(0)
    order = [i for i in np.argsort(-best, kind="stable") if f"i{i}" not in excluded][:n]
    return [f"i{i}" for i in order], [int(scores[:, i].argmax()) for i in order]


def q(user, n=5, **kw):
    return validate(user, n, limits=dataclasses.replace(Limits.from_config(), max_per_interest_n=40), **kw)


def test_stored_path_is_one_search_in_the_records_version_and_equals_the_exact_merge(world):
    recaller, search, _, catalogs, interests = world
    [result] = recaller.recall_many([q("alice", 6, exclude_item_ids=["i7"])], Deadline(1.0))
    assert result.path is RecallPath.STORED_INTERESTS and result.model_version == "A" and result.reason is FallbackReason.NONE
    assert len(search.calls) == 1 and search.calls[0][:3] == ("A", 3, 6 + 3) and search.calls[0][3] == ACTIVE_ONLY
    ids, interest = exact(catalogs["A"], interests, 6, {"i1", "i2", "i7"})  # window + exclusion dropped
    assert [r for r, _, _ in result.items] == ids and [j for _, _, j in result.items] == interest
    assert set(result.stages) == {"feature_store", "vector_search", "merge"}


def test_the_seen_set_is_left_out_of_every_path_of_a_stored_user(world):
    """Items the user saw before the window (the job's seen set) are never returned: the search
    fetches n + |exclusions, window, seen set| per interest, so the answer is still the exact top n
    of the rest; a stored user whose search fails gets popular items without them either."""
    recaller, search, store, catalogs, interests = world
    store.seen_items = 100
    top, _ = exact(catalogs["A"], interests, 4, {"i1", "i2"})
    store.put_many([], seen={"alice": [(5, r) for r in top] + [(1, "i2")]})  # i2: also in the window, counted once
    [result] = recaller.recall_many([q("alice", 6, exclude_item_ids=["i7"])], Deadline(1.0))
    ids, _ = exact(catalogs["A"], interests, 6, {"i1", "i2", "i7", *top})
    assert [r for r, _, _ in result.items] == ids and search.calls[-1][2] == 6 + len({"i1", "i2", "i7", *top})
    search.failure = BackendUnavailable("milvus down")
    [fallback] = recaller.recall_many([q("alice", 6)], Deadline(1.0))
    assert fallback.path is RecallPath.POPULAR_FALLBACK and not {r for r, _, _ in fallback.items} & {"i1", "i2", *top}
    assert [r for r, _, _ in fallback.items] == [f"i{i}" for i in range(40) if f"i{i}" not in {"i1", "i2", *top}][:6]


def test_quota_policy_spreads_the_items_over_the_interests(world):
    recaller, *_ = world
    [result] = recaller.recall_many([q("alice", 9, merge_policy=2)], Deadline(1.0))
    assert sorted(j for _, _, j in result.items) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_filter_goes_to_the_search_after_the_active_flag(world):
    recaller, search, *_ = world
    recaller.recall_many([q("alice", filter_text='category == "x"')], Deadline(1.0))
    assert search.calls[0][3] == 'active == true and (category == "x")'


class SetAvailability:
    def __init__(self, *items):
        self.items = InactiveItems(1, frozenset(items))

    def inactive(self):
        return self.items


def test_inactive_items_are_dropped_on_every_path_even_before_the_search_knows(world):
    """The search (FakeSearch ignores the flag, as Milvus may for a moment after `items
    deactivate`) still returns them; the service's own set drops them, and the rest moves up."""
    recaller, search, store, catalogs, interests = world
    top, _ = exact(catalogs["A"], interests, 3, {"i1", "i2"})
    popular_top = ["i0", "i1"]
    recaller.availability = SetAvailability(*top, *popular_top)
    stored, popular = recaller.recall_many([q("alice", 6), q("nobody", 4)], Deadline(1.0))
    ids, _ = exact(catalogs["A"], interests, 6, {"i1", "i2", *top})
    assert [r for r, _, _ in stored.items] == ids
    active_by_popularity = [f"i{i}" for i in range(40) if f"i{i}" not in {*top, *popular_top}]  # FakeModel ranks i0, i1, ...
    assert popular.path is RecallPath.POPULAR_FALLBACK and [r for r, _, _ in popular.items] == active_by_popularity[:4]


def test_registry_inactive_set_is_serialised_versioned_and_reread_only_when_changed(tmp_path):
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryAvailability

    registry = ModelRegistry(tmp_path / "models")
    assert registry.inactive_items() == InactiveItems(0, frozenset())
    threads = [threading.Thread(target=registry.set_active, args=([f"t{t}-{i}" for i in range(20)], False)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry.inactive_items().items) == 80 and registry.inactive_items().revision == 4  # no update lost
    assert registry.set_active(["t0-0"], False).revision == 4  # no change, no new revision
    assert registry.set_active(["t0-0", "never-inactive"], True) == InactiveItems(5, registry.inactive_items().items)
    assert "t0-0" not in registry.inactive_items().items

    now = [0.0]
    availability = RegistryAvailability(registry, refresh_s=2.0, clock=lambda: now[0])
    assert availability.inactive().revision == 5
    registry.set_active(["x"], False)
    assert availability.inactive().revision == 5  # not looked at again within refresh_s
    now[0] = 2.0
    assert "x" in availability.inactive().items
    registry.inactive_path.write_text("{not json")
    now[0] = 4.0
    assert "x" in availability.inactive().items  # an unreadable file keeps the last good set
    for wrong_shape in ('{"revision": 7, "items": 5}', "[]", "null", '{"revision": "7", "items": []}', '{"revision": 7, "items": [1]}'):
        registry.inactive_path.write_text(wrong_shape)  # JSON, but not the registry's record: the same
        with pytest.raises(InactiveFileError, match="INACTIVE.json is not"):
            registry.inactive_items()
        now[0] += 2.0
        assert "x" in availability.inactive().items
    # a file that cannot even be looked at (ESTALE on a shared volume): the last good set, no error

    class StaleRegistry:
        inactive_path = type("StalePath", (), {"stat": lambda self: (_ for _ in ()).throw(OSError(116, "Stale file handle"))})()

    availability.registry = StaleRegistry()
    now[0] += 2.0
    assert "x" in availability.inactive().items


def test_unknown_user_gets_interests_on_the_fly_then_popular(world):
    recaller, search, _, catalogs, _ = world
    fly, known_nothing, nothing = recaller.recall_many(
        [q("bob", 4, recent_item_ids=["i3", "i5"]), q("carol", 3, recent_item_ids=["zzz"]), q("dave", 3, exclude_item_ids=["i0"])], Deadline(1.0))
    assert fly.path is RecallPath.COMPUTED_ON_THE_FLY and fly.model_version == "B" and fly.reason is FallbackReason.UNKNOWN_USER
    ids, _ = exact(catalogs["B"], catalogs["B"][[3, 5]][:2], 4, {"i3", "i5"})
    assert [r for r, _, _ in fly.items] == ids
    assert known_nothing.path is RecallPath.POPULAR_FALLBACK and known_nothing.reason is FallbackReason.NO_KNOWN_RECENT_ITEMS
    assert nothing.path is RecallPath.POPULAR_FALLBACK and [r for r, _, _ in nothing.items] == ["i1", "i2", "i3"]
    assert all(j == -1 for _, _, j in nothing.items)


def test_a_batch_shares_one_store_read_and_one_search_per_version(world):
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("erin", "A", interests[:1], (), 0, "0:1"), InterestRecord("finn", "B", interests[:2], (), 0, "0:2")])
    reads, read = [], store.get_many
    store.get_many = lambda user_ids: reads.append(list(user_ids)) or read(user_ids)
    results = recaller.recall_many([q("alice"), q("erin"), q("finn")], Deadline(1.0))
    assert reads == [["alice", "erin", "finn"]]
    assert sorted((c[0], c[1]) for c in search.calls) == [("A", 4), ("B", 2)]
    assert [r.model_version for r in results] == ["A", "A", "B"]
    single = recaller.recall_many([q("erin")], Deadline(1.0))[0]
    assert [(r, j) for r, _, j in single.items] == [(r, j) for r, _, j in results[1].items]
    np.testing.assert_allclose([s for _, s, _ in single.items], [s for _, s, _ in results[1].items], rtol=1e-5)


def test_the_deadline_is_checked_between_the_merges_of_a_batch(world, monkeypatch):
    import recall_service.recaller as recaller_module

    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord(f"u{i}", "A", interests, (), 0, f"0:{i}") for i in range(3)])
    now, merge = [0.0], recaller_module.merge_one_by_score

    def merge_taking_500_ms(*args, **kwargs):
        now[0] += 0.5
        return merge(*args, **kwargs)

    monkeypatch.setattr(recaller_module, "merge_one_by_score", merge_taking_500_ms)
    with pytest.raises(DeadlineExceeded, match="merging"):  # two merges use up the 1 s: the third is not started
        recaller.recall_many([q(f"u{i}") for i in range(3)], Deadline(1.0, clock=lambda: now[0]))


def test_a_retired_version_is_recomputed_from_the_stored_window_and_profile(world):
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("alice", "A", interests, ("i1", "i2"), 0, "0:0", profile={"gender": "F"})])
    del search.catalogs["A"]
    [result, stranger] = recaller.recall_many([q("alice"), q("stranger", recent_item_ids=["i4"])], Deadline(1.0))
    assert result.path is RecallPath.COMPUTED_ON_THE_FLY and result.reason is FallbackReason.STORED_VERSION_RETIRED
    assert result.model_version == "B" and not {"i1", "i2"} & {r for r, _, _ in result.items}
    # as the streaming job and the backfill compute them: the user tower reads the profile too
    assert recaller.models.model.profiles_seen == [None, {"gender": "F"}]


def test_feature_store_down_falls_back_and_the_breaker_skips_it(world):
    recaller, search, _, catalogs, _ = world
    clock = [0.0]
    recaller.reader = DownStore()
    recaller.store_breaker = CircuitBreaker(1.0, clock=lambda: clock[0])
    for _ in range(FAILURES_TO_OPEN):
        [result] = recaller.recall_many([q("alice", recent_item_ids=["i4"])], Deadline(1.0))
        assert result.path is RecallPath.COMPUTED_ON_THE_FLY and result.reason is FallbackReason.FEATURE_STORE_UNAVAILABLE
    recaller.reader = None  # the breaker is open: the store is not even called
    assert recaller.recall_many([q("alice")], Deadline(1.0))[0].reason is FallbackReason.FEATURE_STORE_UNAVAILABLE
    clock[0] = 2.0
    recaller.reader = DownStore()
    assert recaller.recall_many([q("alice")], Deadline(1.0))[0].path is RecallPath.POPULAR_FALLBACK


@pytest.mark.parametrize("backend", ["feature_store", "vector_search"])
def test_a_request_out_of_time_is_no_trial_of_a_breaker(world, backend):
    """A request whose deadline had passed took the half-open breaker's one trial, never called the
    backend and never reported: every request fell back for another cool-down on a recovered backend."""
    recaller, search, *_ = world
    clock = [0.0]
    breaker = CircuitBreaker(1.0, clock=lambda: clock[0], failures_to_open=1)
    setattr(recaller, "store_breaker" if backend == "feature_store" else "search_breaker", breaker)
    breaker.failed(0.0)  # opened by an outage
    clock[0] = 2.0  # the cool-down is over: the next caller is the trial
    store, elapsed = recaller.reader, [0.0]
    if backend == "vector_search":  # the store read uses up the request's time: out of time before the search

        class SlowStore:
            def get_many(self, user_ids):
                elapsed[0] += 5.0
                return store.get_many(user_ids)

        recaller.reader = SlowStore()
    with pytest.raises(DeadlineExceeded):
        recaller.recall_many([q("alice")], Deadline(0.0 if backend == "feature_store" else 1.0, clock=lambda: elapsed[0]))
    recaller.reader = store
    [result] = recaller.recall_many([q("alice")], Deadline(1.0))  # the healthy backend is tried and answers
    assert result.path is RecallPath.STORED_INTERESTS and result.reason is FallbackReason.NONE


def test_an_empty_batch_is_no_trial_of_a_down_feature_store(world):
    """An empty BatchRecall reads nothing: taken as the half-open trial, it would close the breaker
    and the next requests would each wait out the store's timeout."""
    recaller, *_ = world
    clock = [0.0]
    recaller.reader = DownStore()
    recaller.store_breaker = CircuitBreaker(1.0, clock=lambda: clock[0], failures_to_open=1)
    recaller.recall_many([q("alice")], Deadline(1.0))  # opens the breaker
    clock[0] = 2.0
    assert recaller.recall_many([], Deadline(1.0)) == []
    assert recaller.store_breaker.allow() and not recaller.store_breaker.allow()  # the trial is still to come


def test_a_filter_the_vector_store_refuses_is_an_answer_for_the_breaker(world):
    recaller, search, *_ = world
    clock = [0.0]
    recaller.search_breaker = CircuitBreaker(1.0, clock=lambda: clock[0], failures_to_open=1)
    search.failure = BackendUnavailable("Milvus down")
    recaller.recall_many([q("alice")], Deadline(1.0))  # opens the breaker
    clock[0] = 2.0
    search.failure = ExpressionRejected("unknown field 'categories'")
    with pytest.raises(InvalidRequest, match="filter: the vector store rejected it"):
        recaller.recall_many([q("alice", filter_text='category contains "x"')], Deadline(1.0))  # the trial
    assert recaller.search_breaker.allow() and recaller.search_breaker.allow()  # Milvus answered: closed


def test_a_batch_whose_filter_the_vector_store_refuses_names_the_request(world):
    """The contract: a request of a batch that fails validation fails the call, naming its index; a
    filter refused by Milvus, found past validation, is named the same way."""
    import grpc

    from recall_service.metrics import RecallMetrics
    from recall_service.server import RecallServicer
    from recall_service.stubs import recall_pb2

    recaller, search, *_ = world
    searches = search.search

    def refusing_filters(version, vectors, limit, expr, timeout_s):
        if expr != ACTIVE_ONLY:
            raise ExpressionRejected("cannot parse expression")
        return searches(version, vectors, limit, expr, timeout_s)

    search.search = refusing_filters

    class Context:
        code = details = None

        def time_remaining(self):
            return 5.0

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    servicer = RecallServicer(recaller, Limits.from_config(), RecallMetrics(), 1.0, 1 << 20)
    batch = [recall_pb2.RecallRequest(user_id="alice", n=3, filter=text) for text in ("", 'category == "x"', "", 'category == "x"')]
    # the same filter on another path (a user computed on the fly: another group, searched later) is named too
    batch.append(recall_pb2.RecallRequest(user_id="nobody", n=3, filter='category == "x"', recent_item_ids=["i4"]))
    context = Context()
    servicer.BatchRecall(recall_pb2.BatchRecallRequest(requests=batch), context)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("requests[1], requests[3], requests[4].filter: the vector store rejected it")
    context = Context()
    servicer.Recall(batch[1], context)  # one request: the field alone, as validation names it
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("filter: the vector store rejected it")


def test_an_expression_milvus_refuses_is_invalid_argument_only_for_a_filter_the_client_sent(world):
    """Milvus' reason text is all that tells a refused expression; only a request that carried a
    filter is answered INVALID_ARGUMENT for it. Without one the refused expression is the service's
    own `active == true` (a collection of another schema): the vector search is unavailable."""
    from pymilvus.grpc_gen import common_pb2, milvus_pb2

    from recall_service.backends import MilvusItemSearch

    class RefusingMilvus:
        """What MilvusItemSearch calls of pymilvus' client: its gRPC stub's Search."""

        def __init__(self, reason):
            self.reason, self._stub = reason, self

        def _get_connection(self):
            return self

        def Search(self, request, timeout):
            return milvus_pb2.SearchResults(status=common_pb2.Status(code=1100, error_code=5, reason=self.reason))

    recaller, *_ = world
    recaller.search = MilvusItemSearch("unused.db")
    recaller.search._client = RefusingMilvus("failed to create query plan: cannot parse expression: active == true, unknown field 'active'")
    [result] = recaller.recall_many([q("alice")], Deadline(1.0))
    assert result.path is RecallPath.POPULAR_FALLBACK and result.reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    with pytest.raises(InvalidRequest, match="filter: the vector store rejected it"):
        recaller.recall_many([q("alice", filter_text='category contains "x"')], Deadline(1.0))
    recaller.fallback_on_outage = False
    with pytest.raises(BackendUnavailable, match="vector search unavailable"):
        recaller.recall_many([q("alice")], Deadline(1.0))
    assert recaller.search_breaker.allow() and recaller.search_breaker.allow()  # Milvus answered every time


def test_a_corrupt_record_under_the_health_key_is_an_answer_of_the_store():
    from recall_service.backends import FeatureStoreReader

    class CorruptRecords:
        def get_many(self, user_ids):
            raise RecordError(f"user {user_ids[0]}: corrupt record")

    FeatureStoreReader(CorruptRecords(), (ConnectionError,)).ping()
    with pytest.raises(BackendUnavailable):
        FeatureStoreReader(DownStore(), (BackendUnavailable,)).ping()


def test_after_the_cool_down_one_trial_caller_reaches_the_backend_and_its_answer_decides():
    clock = [0.0]
    breaker = CircuitBreaker(1.0, clock=lambda: clock[0], failures_to_open=1)
    assert breaker.allow() and breaker.allow()  # closed
    breaker.failed(started=clock[0])
    assert not breaker.allow()
    clock[0] = 1.5
    assert breaker.allow()  # the trial
    assert not breaker.allow() and not breaker.allow()  # the others keep falling back while it runs
    breaker.failed(started=clock[0])  # the trial timed out: open again
    clock[0] = 2.0
    assert not breaker.allow()
    clock[0] = 2.6
    assert breaker.allow()  # the next trial
    breaker.succeeded(started=2.6)
    assert breaker.allow() and breaker.allow()  # closed again
    # a slow answer to a call made before another caller's failure does not close the breaker
    breaker.failed(started=clock[0])  # at 2.6
    breaker.succeeded(started=2.0)
    assert not breaker.allow()
    # a trial that never reports is replaced after a cool-down
    clock[0] = 3.7
    assert breaker.allow() and not breaker.allow()
    clock[0] = 4.8
    assert breaker.allow()


def test_a_hanging_search_costs_a_run_of_timeouts_then_one_callers_per_cool_down(world):
    recaller, search, *_ = world
    clock = [0.0]
    recaller.search_breaker = CircuitBreaker(1.0, clock=lambda: clock[0], failures_to_open=2)
    calls = []

    def hangs(*args):
        calls.append(args)
        raise DeadlineExceeded("no answer within 500 ms")

    search.search = hangs
    for at in (0.0, 0.1, 0.2, 1.0, 1.2, 1.3, 1.4, 2.5):
        clock[0] = at
        assert recaller.recall_many([q("alice")], Deadline(5.0))[0].reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert len(calls) == 4  # at 0.0 and 0.1 (the run that opens it), at 1.2 (the trial after the cool-down), at 2.5 (the next trial)


def test_the_breaker_opens_on_a_run_of_failures_not_on_one():
    clock = [0.0]
    breaker = CircuitBreaker(1.0, clock=lambda: clock[0])
    assert FAILURES_TO_OPEN > 1  # one failed call is no outage
    for _ in range(FAILURES_TO_OPEN - 1):
        breaker.failed(started=clock[0])
    assert breaker.allow()  # one call short of a run: still closed
    breaker.succeeded(started=clock[0])
    for _ in range(FAILURES_TO_OPEN - 2):
        breaker.failed(started=clock[0])
    assert breaker.allow()  # the success ended the run: counted from 0 again
    clock[0] = 0.5
    breaker.failed(started=clock[0])
    breaker.succeeded(started=0.2)  # an answer to a call made before the last failure ends no run
    breaker.failed(started=clock[0])
    assert not breaker.allow()  # the run is complete: open, callers fall back at once
    clock[0] = 1.6
    assert breaker.allow() and not breaker.allow()  # the trial
    breaker.failed(started=clock[0])
    assert not breaker.allow()  # a failed trial opens it again at once


def test_one_search_that_times_out_does_not_switch_vector_search_off_for_everyone(world):
    """A large but valid request whose search ran out of its cap (vector_search_timeout_ms) falls
    back alone; the next client's search goes to Milvus. Only a run of them is an outage."""
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("bob", "A", interests[:1], (), 0, "0:1")])
    real_search = search.search

    def slow_for_alice(version, vectors, limit, expr, timeout_s):
        if len(vectors) == len(interests):  # alice's 3 vectors: her search does not answer within its cap
            search.calls.append((version, len(vectors), limit, expr, timeout_s))
            raise DeadlineExceeded("vector search did not answer within 500 ms")
        return real_search(version, vectors, limit, expr, timeout_s)

    search.search = slow_for_alice
    assert recaller.recall_many([q("alice")], Deadline(5.0))[0].reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert recaller.recall_many([q("bob")], Deadline(5.0))[0].path is RecallPath.STORED_INTERESTS  # another client: served
    for _ in range(FAILURES_TO_OPEN):  # a run of them is an outage: the breaker opens ...
        recaller.recall_many([q("alice")], Deadline(5.0))
    calls = len(search.calls)
    assert recaller.recall_many([q("bob")], Deadline(5.0))[0].reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert len(search.calls) == calls  # ... and requests fall back at once, without a search


def test_a_batch_of_many_groups_counts_one_failed_search_and_waits_out_one_timeout(world):
    """A batch whose users fall in several groups (filters, model versions) is one request: after its
    first search fails the other groups fall back without a search, so a batch with three filters
    neither opens the breaker for every client nor waits out three timeouts."""
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord(user, "A", interests, (), 0, f"0:{i}") for i, user in enumerate(("u0", "u1", "u2", "bob"))])
    real_search = search.search

    def slow_with_a_filter(version, vectors, limit, expr, timeout_s):
        search.calls.append((version, len(vectors), limit, expr, timeout_s))
        if expr != ACTIVE_ONLY:
            raise DeadlineExceeded("vector search did not answer within 500 ms")
        search.calls.pop()
        return real_search(version, vectors, limit, expr, timeout_s)

    search.search = slow_with_a_filter
    batch = [q(user, filter_text=f'category == "c{i}"') for i, user in enumerate(("u0", "u1", "u2"))]
    for _ in range(FAILURES_TO_OPEN - 1):  # one short of a run: a batch is one failure, not three
        assert {r.reason for r in recaller.recall_many(batch, Deadline(5.0))} == {FallbackReason.VECTOR_SEARCH_UNAVAILABLE}
    assert len(search.calls) == FAILURES_TO_OPEN - 1  # one search tried per batch
    assert recaller.recall_many([q("bob")], Deadline(5.0))[0].path is RecallPath.STORED_INTERESTS  # the breaker is closed


def test_a_group_over_the_hits_of_one_call_is_searched_in_calls_that_keep_the_deadline(world, monkeypatch):
    """A batch's group (users x K_u vectors x per-interest limit) goes to Milvus in calls of at most
    MAX_HITS_PER_SEARCH hits, with the same answers as one call, each call capped by the time left."""
    import recall_service.recaller as recaller_module

    recaller, search, store, catalogs, interests = world
    monkeypatch.setattr(recaller_module, "MAX_HITS_PER_SEARCH", 40)
    users = [f"u{i}" for i in range(6)]
    store.put_many([InterestRecord(user, "A", interests, (), 0, f"0:{i}") for i, user in enumerate(users)])
    batch = recaller.recall_many([q(user, 5) for user in users[:5]], Deadline(5.0))  # 15 vectors at limit 5 + 0: 75 hits
    assert [(c[1], c[2]) for c in search.calls] == [(8, 5), (7, 5)]  # 8 x 5 = 40 hits at most per call
    alone = recaller.recall_many([q("u0", 5)], Deadline(5.0))[0]
    for result in batch:
        assert result.path is RecallPath.STORED_INTERESTS and [(r, j) for r, _, j in result.items] == [(r, j) for r, _, j in alone.items]
        np.testing.assert_allclose([s for _, s, _ in result.items], [s for _, s, _ in alone.items], rtol=1e-5)
    # every call has at most the request's time left, and none is sent once it is gone
    clock = [0.0]
    real_search = search.search

    def taking_400_ms(version, vectors, limit, expr, timeout_s):
        clock[0] += 0.4
        return real_search(version, vectors, limit, expr, timeout_s)

    search.search, search.calls = taking_400_ms, []
    recaller.search_timeout_s = 10.0
    with pytest.raises(DeadlineExceeded, match="before the vector search"):
        recaller.recall_many([q(user, 5) for user in users], Deadline(0.7, clock=lambda: clock[0]))
    assert [round(c[4], 3) for c in search.calls] == [0.7, 0.3]  # 18 vectors: the second call had what the first left; no third
    assert recaller.search_breaker.allow()  # the request's own deadline says nothing about Milvus


def test_vector_search_down_falls_back_to_popular_or_raises_when_fallback_is_off(world):
    recaller, search, *_ = world
    search.failure = BackendUnavailable("Milvus down")
    [result] = recaller.recall_many([q("alice", exclude_item_ids=["i3"])], Deadline(1.0))
    assert result.path is RecallPath.POPULAR_FALLBACK and result.reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert {"i1", "i2", "i3"}.isdisjoint(r for r, _, _ in result.items)  # window and exclusions still dropped
    recaller.fallback_on_outage = False
    recaller.search_breaker.succeeded(recaller.clock())
    with pytest.raises(BackendUnavailable, match="vector search unavailable"):
        recaller.recall_many([q("alice")], Deadline(1.0))
    recaller.reader = DownStore()
    with pytest.raises(BackendUnavailable, match="feature store unavailable"):
        recaller.recall_many([q("alice")], Deadline(1.0))


def test_a_rejected_search_falls_back_without_opening_the_breaker_and_slow_ones_open_it(world):
    recaller, search, *_ = world
    for _ in range(FAILURES_TO_OPEN):
        search.failure = SearchRejected("dimension mismatch")
        assert recaller.recall_many([q("alice")], Deadline(1.0))[0].reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert recaller.search_breaker.allow()  # a bad search says nothing about Milvus
    search.failure = DeadlineExceeded("no answer within 500 ms")  # the search's own cap, the request has time left
    for _ in range(FAILURES_TO_OPEN):
        assert recaller.recall_many([q("alice")], Deadline(5.0))[0].reason is FallbackReason.VECTOR_SEARCH_UNAVAILABLE
    assert not recaller.search_breaker.allow()


def test_no_published_model_is_unavailable_for_unknown_users(world):
    recaller, *_ = world
    recaller.models = FakeModels(None)
    assert recaller.recall_many([q("alice")], Deadline(1.0))[0].path is RecallPath.STORED_INTERESTS  # needs no model
    with pytest.raises(BackendUnavailable, match="model_export publish"):
        recaller.recall_many([q("nobody")], Deadline(1.0))


def test_a_corrupt_record_fails_only_its_user(world):
    recaller, _, store, *_ = world
    store.rows["mallory"] = {b"schema": b"1", b"k": b"2"}
    alice, mallory = recaller.recall_many([q("alice"), q("mallory")], Deadline(1.0))
    assert alice.path is RecallPath.STORED_INTERESTS
    assert mallory.path is RecallPath.POPULAR_FALLBACK and mallory.reason is FallbackReason.CORRUPT_RECORD


def test_the_per_user_reads_after_a_corrupt_record_stop_at_the_deadline(world):
    """One corrupt record turns a batch read into a read per user; against a slow store those must
    not outlast the request (64 users x a 200 ms timeout)."""
    recaller, _, store, *_ = world
    store.rows["mallory"] = {b"schema": b"1", b"k": b"2"}
    now = [0.0]
    reads = []
    get_many = store.get_many

    def slow(user_ids):
        reads.append(list(user_ids))
        now[0] += 0.3
        return get_many(user_ids)

    store.get_many = slow
    with pytest.raises(DeadlineExceeded):
        recaller.recall_many([q(user) for user in ["alice", "mallory", *[f"u{i}" for i in range(10)]]], Deadline(1.0, clock=lambda: now[0]))
    assert len(reads) <= 4  # the batch read, then per-user reads until the second is gone


def _stored_as(store, user, **fields):
    """`user` stored as alice is, with some of the hash's fields replaced (bytes, as Redis returns them)."""
    store.rows[user] = {**store.rows["alice"], **{k.encode(): v for k, v in fields.items()}}


@pytest.mark.parametrize("fields", [
    {"k": b"0", "interests": b""},  # no interest: a search of 0 vectors, an answer of 0 items
    {"k": b"1", "dim": b"5", "interests": b"\0" * 20},  # another width than version A's
    {"k": b"1", "interests": np.array([np.nan, np.inf] + [0] * (DIM - 2), "<f4").tobytes()},  # scores nothing: an empty "success"
    {"window": b"[1, 2]"},
    {"window": b"5"},
    {"profile": b'["gender"]'},
    {"profile": b'{"age": 25}'},
], ids=["k=0", "width", "not finite", "window of numbers", "window not a list", "profile not an object", "profile value not a string"])
def test_a_record_that_decodes_but_is_malformed_is_corrupt_for_its_user_only(world, fields):
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("erin", "A", interests[:1], (), 0, "0:1")])
    _stored_as(store, "mallory", **fields)
    recaller.recall_many([q("alice")], Deadline(1.0))  # the search of version A tells its width
    alice, mallory, erin = recaller.recall_many([q("alice"), q("mallory", 3), q("erin")], Deadline(1.0))
    assert alice.path is erin.path is RecallPath.STORED_INTERESTS and len(alice.items) == len(erin.items) == 5
    assert mallory.path is RecallPath.POPULAR_FALLBACK and mallory.reason is FallbackReason.CORRUPT_RECORD and len(mallory.items) == 3
    assert all(n_vectors > 0 for _, n_vectors, *_ in search.calls)


def test_a_record_with_more_interests_than_its_versions_k_is_corrupt_for_its_user_only(world):
    """K_u vectors go to Milvus: a record of more than its version's K (the manifest's n_interests)
    is corrupt, answered CORRUPT_RECORD for its user alone, without the search."""
    recaller, search, store, catalogs, interests = world
    rng = np.random.default_rng(7)
    store.put_many([InterestRecord("bella", "B", rng.standard_normal((4, DIM)).astype(np.float32), ("i1",), 0, "0:1"),
                    InterestRecord("mallory", "B", rng.standard_normal((5, DIM)).astype(np.float32), ("i1",), 0, "0:2")])
    bella, mallory, alice = recaller.recall_many([q("bella"), q("mallory"), q("alice")], Deadline(1.0))
    assert bella.path is alice.path is RecallPath.STORED_INTERESTS  # K = 4 of version B; alice's A is not installed: K unknown
    assert mallory.path is RecallPath.POPULAR_FALLBACK and mallory.reason is FallbackReason.CORRUPT_RECORD
    assert sorted(n_vectors for _, n_vectors, *_ in search.calls) == [3, 4]


def test_what_a_user_with_a_corrupt_record_has_seen_is_left_out_of_the_fallback(world):
    """The seen set comes in the same read as the record: a record found corrupt after decoding
    (here: another width than its version's) still has it and its window, and the popular answer
    leaves both out (the window's items were returned before)."""
    recaller, search, store, catalogs, interests = world
    store.seen_items = 10
    store.put_many([InterestRecord("mallory", "B", np.ones((2, DIM + 1), np.float32), ("i1",), 0, "0:2")], seen={"mallory": [(1, "i0"), (2, "i3")]})
    recaller.recall_many([q("nobody")], Deadline(1.0))  # the current model (B) read: its width is known
    [mallory] = recaller.recall_many([q("mallory", 4)], Deadline(1.0))
    assert mallory.path is RecallPath.POPULAR_FALLBACK and mallory.reason is FallbackReason.CORRUPT_RECORD
    assert [r for r, _, _ in mallory.items] == ["i2", "i4", "i5", "i6"]  # by popularity, without i0, i3 (seen) and i1 (window)


def test_the_current_models_width_is_known_before_any_search(world):
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("bella", "B", np.ones((2, DIM + 1), np.float32), ("i1",), 0, "0:1")])
    recaller.recall_many([q("nobody")], Deadline(1.0))  # the popular path reads the current model (B)
    [bella] = recaller.recall_many([q("bella")], Deadline(1.0))
    assert bella.reason is FallbackReason.CORRUPT_RECORD and not search.calls


def test_a_width_no_search_has_told_yet_fails_only_its_own_search(world):
    """A rejected search (Milvus refuses vectors of another width) is confined to the requests of that width."""
    recaller, search, store, catalogs, interests = world
    store.put_many([InterestRecord("mallory", "A", np.ones((1, DIM + 1), np.float32), (), 0, "0:1")])
    real_search = search.search

    def search_refusing_other_widths(version, vectors, limit, expr, timeout_s):
        if vectors.shape[1] != DIM:
            raise SearchRejected("vector dimension mismatch")
        return real_search(version, vectors, limit, expr, timeout_s)

    search.search = search_refusing_other_widths
    alice, mallory = recaller.recall_many([q("alice"), q("mallory")], Deadline(1.0))
    assert alice.path is RecallPath.STORED_INTERESTS and mallory.path is RecallPath.POPULAR_FALLBACK
    assert recaller.recall_many([q("mallory")], Deadline(1.0))[0].reason is FallbackReason.CORRUPT_RECORD  # now the width is known


def test_the_deadline_bounds_the_search_and_stops_late_work(world):
    recaller, search, *_ = world
    recaller.search_timeout_s = 5.0
    recaller.recall_many([q("alice")], Deadline(0.25))
    assert 0 < search.calls[0][4] <= 0.25
    clock = [0.0]
    late = Deadline(0.1, clock=lambda: clock[0])
    clock[0] = 0.2
    with pytest.raises(DeadlineExceeded, match="feature store"):
        recaller.recall_many([q("alice")], late)


def test_a_search_given_the_requests_time_left_that_runs_out_is_the_requests_deadline_not_milvus(world):
    """Milvus' client and the request's clock may disagree by a hair: a call whose timeout was the
    request's time left (under vector_search_timeout_ms) is the request's DEADLINE_EXCEEDED, never a
    failure of Milvus in the breaker's count."""
    recaller, search, *_ = world
    search.failure = DeadlineExceeded("vector search did not answer within 200 ms")
    frozen = Deadline(0.2, clock=lambda: 0.0)  # its time never runs out on its own clock
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(DeadlineExceeded):
            recaller.recall_many([q("alice")], frozen)
    assert recaller.search_breaker.failures == 0 and recaller.search_breaker.allow()


@pytest.mark.parametrize("user, recent, slow, stage", [
    ("nobody", [], "store", "the popular items"),
    ("bob", ["i3"], "store", "the user tower"),
    ("alice", [], "search", "merging"),
])
def test_no_path_answers_after_the_deadline(world, user, recent, slow, stage):
    """The client has stopped waiting by then: the answer would be lost, yet counted OK."""
    recaller, search, store, *_ = world
    clock = [0.0]
    deadline = Deadline(0.1, clock=lambda: clock[0])

    def late(call):
        def slow_call(*args):
            clock[0] = 0.2
            return call(*args)
        return slow_call

    if slow == "store":
        store.get_many = late(store.get_many)
    else:
        search.search = late(search.search)
    with pytest.raises(DeadlineExceeded, match=f"before {stage}"):
        recaller.recall_many([q(user, recent_item_ids=recent)], deadline)


# -- coalesced searches -------------------------------------------------------------------------


class GatedSearch(FakeSearch):
    """The first call blocks until `gate` is set, so that others queue up behind it."""

    def __init__(self, catalogs):
        super().__init__(catalogs)
        self.gate, self.entered = threading.Event(), threading.Event()

    def search(self, version, vectors, limit, expr, timeout_s):
        self.entered.set()
        self.gate.wait(5)
        return super().search(version, vectors, limit, expr, timeout_s)


def _waiting(search) -> int:
    """Searches queued behind the one in flight, over every key of a CoalescingSearch."""
    return sum(len(q) for q in search._queues.values())


def _queue_behind_a_gated_call(inner, search, first: threading.Thread, queued: list[threading.Thread]) -> None:
    """Starts `first` and, once its call holds `inner`'s gate, the `queued` threads; when all of them
    wait in `search`'s queue, opens the gate and joins every thread."""
    first.start()
    inner.entered.wait(5)
    for t in queued:
        t.start()
    while _waiting(search) < len(queued):
        time.sleep(0.001)
    inner.gate.set()
    for t in [first, *queued]:
        t.join(5)


def test_concurrent_searches_go_out_as_one_call_and_get_their_own_rows(world):
    from recall_service.coalesce import CoalescingSearch

    _, _, _, catalogs, _ = world
    inner = GatedSearch(catalogs)
    search = CoalescingSearch(inner, max_vectors=64)
    rng = np.random.default_rng(3)
    asks = [(rng.standard_normal((k, DIM)).astype(np.float32), limit) for k, limit in ((2, 5), (1, 9), (3, 4), (2, 7))]
    results = [None] * len(asks)

    def ask(i):
        results[i] = search.search("A", asks[i][0], asks[i][1], ACTIVE_ONLY, 5.0)

    _queue_behind_a_gated_call(inner, search, threading.Thread(target=ask, args=(0,)), [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)])
    assert [(c[1], c[2]) for c in inner.calls] == [(2, 5), (1 + 3 + 2, 9)]  # one call for the three that waited
    for (vectors, limit), got in zip(asks, results):
        alone = FakeSearch(catalogs).search("A", vectors, limit, ACTIVE_ONLY, 1.0)
        assert got.item_ids.tolist() == alone.item_ids.tolist() and got.raw_ids.tolist() == alone.raw_ids.tolist()
    assert not search._in_flight and not search._queues


@pytest.fixture
def one_vector_asks(world):
    """A CoalescingSearch over a GatedSearch, and `ask(name, timeout)`: one vector searched through
    it, its hits' shape or its exception's name put in `outcomes[name]`."""
    from recall_service.coalesce import CoalescingSearch

    _, _, _, catalogs, _ = world
    inner = GatedSearch(catalogs)
    search = CoalescingSearch(inner)
    outcomes = {}

    def ask(name, timeout):
        try:
            outcomes[name] = search.search("A", np.ones((1, DIM), np.float32), 3, ACTIVE_ONLY, timeout).item_ids.shape
        except Exception as exc:
            outcomes[name] = type(exc).__name__

    return inner, search, outcomes, ask


def test_a_coalesced_search_shares_errors_and_a_waiter_can_give_up(one_vector_asks):
    inner, search, outcomes, ask = one_vector_asks
    first = threading.Thread(target=ask, args=("first", 5.0))
    first.start()
    inner.entered.wait(5)
    ask("impatient", 0.05)  # the first call holds the collection past this one's deadline
    assert outcomes["impatient"] == "DeadlineExceeded"
    inner.failure = BackendUnavailable("Milvus down")
    late = threading.Thread(target=ask, args=("late", 5.0))
    late.start()
    while not search._queues.get(("A", ACTIVE_ONLY, DIM)):
        time.sleep(0.001)
    inner.gate.set()
    first.join(5)
    late.join(5)
    assert outcomes == {"impatient": "DeadlineExceeded", "first": "BackendUnavailable", "late": "BackendUnavailable"}
    assert len(inner.calls) == 2 and not search._in_flight


def test_each_coalesced_waiter_raises_its_own_copy_of_the_shared_error(one_vector_asks):
    """One exception object raised in every waiter's thread gathered all their frames in one traceback."""
    inner, search, _, _ = one_vector_asks
    caught = {}

    def ask(name):
        try:
            search.search("A", np.ones((1, DIM), np.float32), 3, ACTIVE_ONLY, 5.0)
        except BackendUnavailable as exc:
            caught[name] = exc

    inner.failure = BackendUnavailable("Milvus down")  # raised by every call once the gate opens
    _queue_behind_a_gated_call(inner, search, threading.Thread(target=ask, args=("first",)),
                               [threading.Thread(target=ask, args=(f"w{i}",)) for i in range(3)])
    shared = [caught[f"w{i}"] for i in range(3)]
    assert len({id(e) for e in shared}) == 3 and {str(e) for e in shared} == {"Milvus down"}
    assert len({id(e.__cause__) for e in shared}) == 1  # the call's own error, raised where it failed
    assert all(sum(frame.name == "ask" for frame in traceback.extract_tb(e.__traceback__)) == 1 for e in shared)


def test_one_failed_call_shared_by_coalesced_searches_does_not_open_the_breaker(world):
    """Three requests whose searches went out as one Milvus call all fail with it: one failure, not a
    run of FAILURES_TO_OPEN, so the next client's search still goes to Milvus."""
    from recall_service.coalesce import CoalescingSearch

    recaller, _, store, catalogs, interests = world
    store.put_many([InterestRecord(f"u{i}", "A", interests[:1], (), 0, f"0:{i}") for i in range(4)])

    class FailsItsSecondCall(GatedSearch):
        def search(self, version, vectors, limit, expr, timeout_s):
            self.failure = BackendUnavailable("Milvus: one slow moment") if len(self.calls) == 1 else None
            return super().search(version, vectors, limit, expr, timeout_s)

    inner = FailsItsSecondCall(catalogs)
    recaller.search = CoalescingSearch(inner)
    results = {}

    def ask(user):
        results[user] = recaller.recall_many([q(user)], Deadline(5.0))[0]

    _queue_behind_a_gated_call(inner, recaller.search, threading.Thread(target=ask, args=("u0",)),
                               [threading.Thread(target=ask, args=(f"u{i}",)) for i in (1, 2, 3)])
    assert FAILURES_TO_OPEN <= 3 and [call[1] for call in inner.calls] == [1, 3]  # vectors per call: the three shared the second
    assert {results[f"u{i}"].reason for i in (1, 2, 3)} == {FallbackReason.VECTOR_SEARCH_UNAVAILABLE}
    assert recaller.recall_many([q("u0")], Deadline(5.0))[0].path is RecallPath.STORED_INTERESTS and len(inner.calls) == 3


def test_a_coalesced_waiter_never_waits_past_its_own_timeout(one_vector_asks):
    """The shared call is sent with the most patient member's time; the others give up at their own."""
    inner, search, outcomes, ask = one_vector_asks
    first_gate = inner.gate
    first = threading.Thread(target=ask, args=("first", 5.0))
    first.start()
    inner.entered.wait(5)
    impatient, patient = threading.Thread(target=ask, args=("impatient", 1.0)), threading.Thread(target=ask, args=("patient", 10.0))
    impatient.start()
    patient.start()
    while _waiting(search) < 2:
        time.sleep(0.001)
    inner.entered.clear()
    inner.gate = threading.Event()  # holds the second call
    first_gate.set()
    assert inner.entered.wait(5)  # the two waiters' batch is in flight
    impatient.join(3)  # while the call it is in still runs
    assert outcomes.get("impatient") == "DeadlineExceeded"
    inner.gate.set()
    for t in (first, patient):
        t.join(5)
    assert outcomes["first"] == outcomes["patient"] == (1, 3)
    assert inner.calls[1][1] == 2 and inner.calls[1][4] > 5.0  # both vectors, the patient one's time
    assert not search._in_flight and not search._queues


def test_a_search_of_another_width_is_never_batched_with_others(world):
    from recall_service.coalesce import CoalescingSearch

    _, _, _, catalogs, _ = world
    inner = GatedSearch(catalogs)
    search = CoalescingSearch(inner)
    outcomes = {}

    def ask(name, width):
        try:
            outcomes[name] = search.search("A", np.ones((1, width), np.float32), 3, ACTIVE_ONLY, 5.0).item_ids.shape
        except ValueError:  # what FakeSearch raises for vectors of the wrong width
            outcomes[name] = "refused"

    first = threading.Thread(target=ask, args=("first", DIM))
    first.start()
    inner.entered.wait(5)  # in flight: what comes now waits for the next batch of its key
    others = [threading.Thread(target=ask, args=("waiting", DIM)), threading.Thread(target=ask, args=("wide", DIM + 1))]
    others[0].start()
    while _waiting(search) < 1:
        time.sleep(0.001)
    others[1].start()
    while len(search._in_flight) < 2 and _waiting(search) < 2:  # sent at once, or queued with "waiting"
        time.sleep(0.001)
    inner.gate.set()
    for t in [first, *others]:
        t.join(5)
    assert outcomes == {"first": (1, 3), "waiting": (1, 3), "wide": "refused"}


def test_a_coalesced_call_never_asks_for_more_hits_than_one_call_may(world):
    from recall_service.coalesce import CoalescingSearch

    _, _, _, catalogs, _ = world
    inner = GatedSearch(catalogs)
    search = CoalescingSearch(inner, max_vectors=256)
    limit = MAX_HITS_PER_SEARCH // 4  # two vectors of each waiter: half the hits of a call
    results = {}

    def ask(name, k):
        results[name] = search.search("A", np.ones((k, DIM), np.float32), limit, ACTIVE_ONLY, 5.0).item_ids.shape

    threads = [threading.Thread(target=ask, args=("first", 1))]
    threads[0].start()
    inner.entered.wait(5)
    for name in ("a", "b", "c"):
        threads.append(threading.Thread(target=ask, args=(name, 2)))
        threads[-1].start()
        while name != "c" and _waiting(search) < len(threads) - 1:  # a, then b, queued in this order
            time.sleep(0.001)
    # c does not fit beside a and b: their full batch goes out now, beside the first call, not after it
    deadline = time.monotonic() + 5
    while (search._in_flight.get(("A", ACTIVE_ONLY, DIM)) != 2 or _waiting(search) != 1) and time.monotonic() < deadline:
        time.sleep(0.001)
    in_flight, waiting = search._in_flight.get(("A", ACTIVE_ONLY, DIM)), _waiting(search)
    inner.gate.set()
    for t in threads:
        t.join(5)
    assert (in_flight, waiting) == (2, 1)  # the first call and a + b's, c waiting for one of them to return
    assert sorted(c[1] for c in inner.calls) == [1, 2, 4]  # a and b together (2 x 2 vectors x limit = the cap), c alone
    assert all(n * call_limit <= MAX_HITS_PER_SEARCH for _, n, call_limit, *_ in inner.calls) and len(results) == 4
    assert not search._in_flight and not search._queues


def test_coalesced_searches_too_deep_to_share_a_call_are_not_sent_one_call_after_another(world):
    """Deep searches (one fills a call) queued behind a call in flight go out beside it, each in its
    own call, not one after another."""
    from recall_service.coalesce import CoalescingSearch

    _, _, _, catalogs, _ = world

    class CountingGatedSearch(GatedSearch):
        def __init__(self, catalogs):
            super().__init__(catalogs)
            self.lock, self.started = threading.Lock(), 0

        def search(self, version, vectors, limit, expr, timeout_s):
            with self.lock:
                self.started += 1
            return super().search(version, vectors, limit, expr, timeout_s)

    inner = CountingGatedSearch(catalogs)
    search = CoalescingSearch(inner)
    limit = MAX_HITS_PER_SEARCH // 4  # 4 vectors fill a call
    threads = [threading.Thread(target=search.search, args=("A", np.ones((4, DIM), np.float32), limit, ACTIVE_ONLY, 10.0)) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while inner.started + _waiting(search) < 8 and time.monotonic() < deadline:
        time.sleep(0.001)
    started, waiting = inner.started, _waiting(search)
    inner.gate.set()
    for t in threads:
        t.join(10)
    assert (started, waiting) == (7, 1)  # the last may still grow; queued behind the first call they were (1, 7)
    assert len(inner.calls) == 8 and not search._in_flight and not search._queues


def test_stubs_are_regenerated_only_when_the_proto_or_the_generator_changes(tmp_path):
    from recall_service import stubs

    target = stubs.generate(tmp_path / "generated")
    module = target / "mindstream" / "recall" / "v1" / "recall_pb2.py"
    first = module.stat().st_mtime_ns
    assert stubs.generate(target).samefile(target) and module.stat().st_mtime_ns == first  # current: untouched
    (target / stubs.STAMP_FILE).write_text("an older recall.proto\n")
    stubs.generate(target)
    assert (target / stubs.STAMP_FILE).read_text() == stubs._stamp() and module.stat().st_mtime_ns != first
    assert "mindstream/recall/v1/recall.proto" in module.read_text()


def test_the_serving_merge_of_one_user_equals_the_papers_merge():
    from recall_service.merge import merge_one_by_score

    rng = np.random.default_rng(5)
    for trial in range(200):
        k, per, n = rng.integers(1, 5), rng.integers(1, 30), rng.integers(1, 40)
        ids = rng.integers(1, 25, (k, per))  # many duplicates across and within interests
        scores = rng.choice([0.1, 0.2, 0.3, 0.5, -np.inf], (k, per)).astype(np.float32) if trial % 2 else rng.random((k, per)).astype(np.float32)
        excluded = set(rng.integers(1, 25, 3).tolist())
        masked = np.where(np.isin(ids, list(excluded)), -np.inf, scores)
        out_ids, out_scores, out_interest = merge_by_score(ids[None], masked[None], n)
        expected = [(i, s, j) for i, s, j in zip(out_ids[0].tolist(), out_scores[0].tolist(), out_interest[0].tolist()) if i != MISSING_ITEM]
        assert merge_one_by_score(ids, scores, n, (excluded,)) == expected
        assert merge_one_by_score(ids.astype(str).astype(object), scores, n, (set(), {str(i) for i in excluded})) == [(str(i), s, j) for i, s, j in expected]


@pytest.mark.parametrize("topks, limit", [([3, 3], 3), ([3, 0, 5], 4), ([5, 1], 3), ([], 2), ([2, 2], 5)])
def test_milvus_results_become_rows_per_query_cut_to_the_limit_and_padded(topks, limit):
    """_hits reads Milvus' flat SearchResultData (query q's hits after those of the queries before it)."""
    from pymilvus.grpc_gen import schema_pb2

    from recall_service.backends import _hits

    nq = max(len(topks), 2)
    per_query = [[(100 * q + r, 1.0 - 0.1 * r) for r in range(count)] for q, count in enumerate(topks)] + [[] for _ in range(nq - len(topks))]
    flat = [hit for hits in per_query for hit in hits]
    results = schema_pb2.SearchResultData(num_queries=nq, topks=topks, scores=[s for _, s in flat])
    results.ids.int_id.data.extend([i for i, _ in flat])
    raw = results.fields_data.add()
    raw.field_name = "raw_id"
    raw.scalars.string_data.data.extend([f"r{i}" for i, _ in flat])
    hits = _hits(results, nq, limit)
    assert hits.item_ids.shape == hits.scores.shape == hits.raw_ids.shape == (nq, limit)
    for q, expected in enumerate(per_query):
        kept = expected[:limit]
        assert hits.item_ids[q].tolist() == [i for i, _ in kept] + [MISSING_ITEM] * (limit - len(kept))
        assert hits.raw_ids[q].tolist() == [f"r{i}" for i, _ in kept] + [""] * (limit - len(kept))
        assert np.allclose(hits.scores[q, :len(kept)], [s for _, s in kept]) and np.all(np.isneginf(hits.scores[q, len(kept):]))


def test_raw_ids_come_from_the_vocabulary_by_item_id_when_one_is_given():
    """Item id i + 1 is the vocabulary's item i (publish numbers rows so); padding and ids the
    vocabulary lacks read "" (no item) with a padding score, whatever raw_id field the reply has,
    so no merge answers them."""
    from pymilvus.grpc_gen import schema_pb2

    from recall_service.backends import _hits
    from recall_service.merge import merge_one_by_score

    vocabulary = np.array(["", "a", "b", "c"], dtype=object)
    results = schema_pb2.SearchResultData(num_queries=2, topks=[3, 1], scores=[0.9, 0.8, 0.7, 0.5])
    results.ids.int_id.data.extend([3, 1, 9, 2])
    hits = _hits(results, 2, 3, vocabulary)
    assert hits.raw_ids.tolist() == [["c", "a", ""], ["b", "", ""]]
    assert hits.item_ids.tolist() == [[3, 1, MISSING_ITEM], [2, MISSING_ITEM, MISSING_ITEM]]
    assert np.allclose(hits.scores[:, :1], [[0.9], [0.5]]) and hits.scores[0, 1] == np.float32(0.8) and np.isneginf(hits.scores[0, 2])
    assert [item for item, _, _ in merge_one_by_score(hits.raw_ids, hits.scores, 5)] == ["c", "a", "b"]  # never ""


def test_a_versions_vocabulary_is_read_in_the_background_and_a_missing_one_looked_for_again_later(two_exports, tmp_path):
    from model_export.artifact import ModelArtifact
    from model_export.manifest import Manifest
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryVocabularies

    registry = ModelRegistry(tmp_path / "models")
    now = [0.0]
    vocabularies = RegistryVocabularies(registry, keep=2, retry_s=30.0, clock=lambda: now[0])
    version = ModelArtifact.load(two_exports[0]).version
    assert vocabularies.raw_ids(version) is None  # not installed: Milvus' raw ids meanwhile
    registry.install(two_exports[0])
    assert vocabularies.raw_ids(version) is None  # not looked for again before the registry is listed again (2 s)
    now[0] = 31.0
    vocabularies.raw_ids(version)
    wait_for(lambda: vocabularies.raw_ids(version) is not None, 10, "the vocabulary read")
    assert vocabularies.raw_ids(version).tolist() == ["", *ModelArtifact.load(two_exports[0]).raw_items]
    # the versions searched last are kept: `version` searched after `other`, so a third one evicts `other`
    other = registry.install(two_exports[1]).model_version
    now[0] = 33.0
    wait_for(lambda: vocabularies.raw_ids(other) is not None, 10, "the second vocabulary")
    now[0] = 40.0
    assert vocabularies.raw_ids(version) is not None
    third = dataclasses.replace(Manifest.load(two_exports[1]), model_version="v-third")
    shutil.copytree(two_exports[1], tmp_path / "third")
    third.write(tmp_path / "third")
    registry.install(tmp_path / "third")
    now[0] = 50.0
    wait_for(lambda: vocabularies.raw_ids("v-third") is not None, 10, "the third vocabulary")
    assert sorted(vocabularies._read) == sorted([version, "v-third"])


def test_the_loaded_models_vocabulary_is_shared_not_read_again(two_exports, tmp_path):
    from model_export.artifact import ModelArtifact
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryModels, RegistryVocabularies

    registry = ModelRegistry(tmp_path / "models")
    old, new = (registry.install(export).model_version for export in two_exports)
    registry.set_current(new)
    now = [0.0]
    models = RegistryModels(registry, prefer_gpu=False, clock=lambda: now[0])
    vocabularies = RegistryVocabularies(registry, loaded=models.raw_ids)
    assert models.raw_ids(new) is None  # not loaded yet
    models.prepare()
    shared = vocabularies.raw_ids(new)
    assert shared is models.current().raw_ids and shared.tolist() == ["", *ModelArtifact.load(two_exports[1]).raw_items]
    assert not any(t.name.startswith("vocabulary-") for t in threading.enumerate()) and not vocabularies._read
    assert vocabularies.raw_ids(old) is None  # an older version's is read from its files, in the background
    wait_for(lambda: vocabularies.raw_ids(old) is not None, 10, "the older vocabulary")
    assert vocabularies.raw_ids(old).tolist() == ["", *ModelArtifact.load(two_exports[0]).raw_items]
    # read before its model was loaded (records of a new version come before the prober loads it):
    # once the model is loaded its copy is used and the one read here let go
    registry.set_current(old)
    now[0] += 2.0  # CURRENT is looked at again
    models.prepare()
    assert vocabularies.raw_ids(old) is models.current().raw_ids and old not in vocabularies._read and old not in vocabularies._used


class PathCountingRegistry(ModelRegistry):
    """Counts the lookups of a version's folder: every read of a version's files starts with one."""

    paths = 0

    def path(self, model_version):
        self.paths += 1
        return super().path(model_version)


def test_a_version_not_installed_starts_no_vocabulary_read_and_is_not_remembered(two_exports, tmp_path):
    """A corrupt record may name any model version, on every request: for one the registry does not
    have, the raw ids are Milvus' raw_id field at once, with no read started and nothing kept."""
    from recall_service.backends import RegistryVocabularies

    registry = PathCountingRegistry(tmp_path / "models")
    registry.install(two_exports[0])
    vocabularies = RegistryVocabularies(registry)
    for i in range(50):
        assert vocabularies.raw_ids(f"bogus-{i}") is None
    assert not vocabularies._pending and not vocabularies._used and registry.paths <= 1  # at most the installed version's manifest
    assert not any(t.name.startswith("vocabulary-bogus") for t in threading.enumerate())


def test_an_installed_versions_shape_is_its_manifests_and_another_costs_no_file_read(two_exports, tmp_path):
    from model_export.manifest import Manifest
    from recall_service.backends import InstalledVersions, RegistryModels

    registry = PathCountingRegistry(tmp_path / "models")
    version = registry.install(two_exports[0]).model_version
    manifest = Manifest.load(two_exports[0])
    models = RegistryModels(registry, prefer_gpu=False, installed=InstalledVersions(registry))
    assert models.shape(version) == VersionShape(manifest.dim, manifest.n_interests)
    assert all(models.shape(f"bogus-{i}") is None for i in range(50)) and registry.paths == 1  # the one manifest read


def test_a_model_retired_since_the_last_look_at_current_is_replaced_by_the_new_current(two_exports, tmp_path):
    """A refresh moves CURRENT, then retires the old version; a service that read CURRENT just
    before (it re-reads at most every refresh_s) must serve the new version, not fail."""
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryModels

    registry = ModelRegistry(tmp_path / "models")
    old, new = (registry.install(export).model_version for export in two_exports)
    registry.set_current(old)
    models = RegistryModels(registry, prefer_gpu=False, refresh_s=3600)
    assert models.current_version() == old  # read, not loaded yet
    registry.set_current(new)
    registry.remove(old)
    assert models.current().version == new
    shutil.rmtree(registry.path(new))  # the current version itself gone: a clear error
    models = RegistryModels(registry, prefer_gpu=False, refresh_s=3600)
    with pytest.raises(BackendUnavailable, match=f"current model {new} cannot be loaded"):
        models.current()


def test_a_published_version_is_loaded_by_prepare_while_requests_go_on_with_the_loaded_one(two_exports, tmp_path):
    """No request waits on a model load once one version is loaded; a version that fails to load is
    not loaded again by every request; an unreadable CURRENT keeps the version read last."""
    from model_export.manifest import Manifest
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryModels

    class CountingRegistry(ModelRegistry):
        loads = 0

        def path(self, version):
            CountingRegistry.loads += 1
            return super().path(version)

    registry = CountingRegistry(tmp_path / "models")
    old, new = (registry.install(export).model_version for export in two_exports)
    registry.set_current(old)
    now = [0.0]
    models = RegistryModels(registry, prefer_gpu=False, refresh_s=1.0, clock=lambda: now[0])
    assert models.current().version == old  # nothing loaded yet: the first request loads it
    registry.set_current(new)
    now[0] = 2.0
    loads = CountingRegistry.loads
    assert models.current_version() == new and models.current().version == old and CountingRegistry.loads == loads
    models.prepare()
    assert models.current().version == new and CountingRegistry.loads == loads + 1
    # a rollback to the version still loaded serves it at once, and keeps serving it while the next
    # version loads or fails to load (not the version rolled back from)
    registry.set_current(old)
    now[0] = 3.0
    assert models.current().version == old and list(models._loaded) == [new, old]  # no load: still in memory
    models._loaded.pop(new)  # as if a third version had been loaded since
    registry.set_current(new)
    now[0] = 4.0
    assert models.current().version == old  # `new` loads in prepare, the rolled-back-to version answers meanwhile
    models.prepare()
    assert models.current().version == new
    # CURRENT unreadable (a shared volume's hiccup): the version read last stays
    (registry.root / "CURRENT.json").write_text("{not json")
    now[0] = 5.0
    assert models.current_version() == new and models.current().version == new
    # a version that cannot be loaded: prepare fails, requests keep the loaded one, and on a cold
    # start one failed load answers every request until refresh_s has passed
    shutil.copytree(two_exports[1], tmp_path / "broken")
    dataclasses.replace(Manifest.load(two_exports[1]), model_version="v-broken").write(tmp_path / "broken")
    registry.install(tmp_path / "broken")
    (registry.path("v-broken") / "vocab.json").write_text("{}")  # tampered with after the install
    registry.set_current("v-broken")
    now[0] = 6.0
    with pytest.raises(BackendUnavailable, match="current model v-broken cannot be loaded"):
        models.prepare()
    assert models.current().version == new
    cold = RegistryModels(registry, prefer_gpu=False, refresh_s=1.0, clock=lambda: now[0])
    loads = CountingRegistry.loads
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="current model v-broken cannot be loaded"):
            cold.current()
    assert CountingRegistry.loads == loads + 1  # one load for the three requests


@pytest.mark.parametrize("text", [None, 'category like "item_genre=g2%"', 'category contains "item_genre=g1" or category == "item_genre=g3"',
                                  'not category contains "item_genre=g0"', 'category == "no such category"'])
def test_popular_items_are_the_most_popular_active_items_that_pass_the_filter(two_exports, text):
    """The popular fallback evaluates a filter once per distinct category pair; it must answer as the
    filter's predicate does item by item, in popularity order (ties: lower row first)."""
    from model_export.artifact import ModelArtifact
    from model_export.publish import category_fields
    from recall_service.backends import LoadedModel

    artifact = ModelArtifact.load(two_exports[0])
    model = LoadedModel(two_exports[0], prefer_gpu=False, popular_depth=12)
    item_filter = parse_filter(text) if text else None
    order = np.argsort(-artifact.popularity, kind="stable")
    inactive = InactiveItems(3, frozenset({artifact.raw_items[order[0]], artifact.raw_items[order[5]], "unknown-item"}))
    excluded = frozenset({artifact.raw_items[order[2]]})
    passing = [i for i in order if artifact.raw_items[i] not in inactive.items
               and (item_filter is None or item_filter.matches(*category_fields(artifact.item_side[i]), True))]
    expected = [(artifact.raw_items[i], float(artifact.popularity[i])) for i in passing[:12] if artifact.raw_items[i] not in excluded][:8]
    assert model.popular(8, item_filter, excluded, inactive) == expected
    assert model.popular(8, item_filter, excluded, inactive) == expected  # from the cache
    # another inactive revision is another answer, not the cached one
    unfiltered = [i for i in order if item_filter is None or item_filter.matches(*category_fields(artifact.item_side[i]), True)]
    assert model.popular(8, item_filter, frozenset(), NO_INACTIVE) == [(artifact.raw_items[i], float(artifact.popularity[i])) for i in unfiltered[:8]]
    # a revision can repeat with other items (INACTIVE.json deleted, then written anew from revision 1)
    other = InactiveItems(3, frozenset({artifact.raw_items[order[1]]}))
    answer = [raw for raw, _ in model.popular(8, item_filter, frozenset(), other)]
    assert all(raw not in other.items for raw in answer)
    if item_filter is None:  # the most popular item, inactive in the first set, is active in this one
        assert artifact.raw_items[order[0]] in answer


def test_the_bench_catalog_of_an_export_is_a_valid_export_of_its_own(two_exports, tmp_path):
    """`recall_service bench` serves a catalog grown from a trained export; exports also carry
    training weights, which a catalog (other items) must not claim."""
    from model_export.manifest import Manifest
    from recall_service.bench import build_catalog

    source = Manifest.load(two_exports[0])
    catalog = build_catalog(two_exports[0], source.n_items + 40, tmp_path)
    manifest = Manifest.load(catalog)  # verifies every listed file against its SHA-256
    assert "weights" in source.files and "weights" not in manifest.files
    assert manifest.n_items == source.n_items + 40
    vectors = np.load(manifest.file(catalog, "item_vectors"))
    assert vectors.shape == (source.n_items + 40, source.dim)
    assert np.array_equal(vectors[:source.n_items], np.load(source.file(two_exports[0], "item_vectors")))
    assert build_catalog(two_exports[0], source.n_items + 40, tmp_path) == catalog  # built once, then reused


class Switchable:
    """A backend whose ping fails while `down` is set."""

    def __init__(self, name):
        self.name, self.down = name, False

    def ping(self):
        if self.down:
            raise BackendUnavailable(f"{self.name}: connection refused (attempt {time.monotonic()})")  # the text varies per probe


def test_a_failing_health_probe_is_logged_and_counted_and_probing_goes_on(caplog, tmp_path):
    from infra.config import load_config
    from recall_service.server import RecallServer

    class FailingOnce:
        def __init__(self):
            self.reads = 0

        def inactive(self):
            self.reads += 1
            if self.reads == 1:
                raise RuntimeError("a bug")
            return InactiveItems(1, frozenset({"x"}))

    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path), "MINDSTREAM_RECALL__HEALTH_INTERVAL_MS": "10"})
    server = RecallServer(config, reader=Switchable("feature store"), search=Switchable("Milvus"), models=FakeModels(None), availability=FailingOnce())
    prober = threading.Thread(target=server._probe_loop)
    prober.start()
    try:
        deadline = time.monotonic() + 5
        while server.metrics.inactive_items._value.get() != 1:  # set by a probe after the failed one
            assert time.monotonic() < deadline, "probing stopped at the failed probe"
            time.sleep(0.01)
    finally:
        server._stop.set()
        prober.join(5)
    assert server.metrics.unexpected.labels("health_probe")._value.get() == 1
    assert any("health probe failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_health_probe_logs_an_outage_when_it_starts_and_when_it_ends(caplog, tmp_path):
    from infra.config import load_config
    from recall_service.server import RecallServer

    store, search, models = Switchable("feature store"), Switchable("Milvus"), FakeModels(None)
    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path)})
    server = RecallServer(config, reader=store, search=search, models=models, availability=SetAvailability())
    caplog.set_level("INFO", logger="recall_service.server")
    assert not any([server.probe() for _ in range(2)])  # nothing published yet
    models.model = FakeModel("B", np.zeros((3, DIM), np.float32))
    assert server.probe()
    store.down = True
    assert not any([server.probe() for _ in range(3)])
    search.down = True
    assert not server.probe()  # a second backend down is news
    store.down = search.down = False
    assert server.probe() and server.probe()
    said = [r.getMessage() for r in caplog.records if "serving" in r.getMessage()]
    assert len(said) == 5, said
    assert said[0].startswith("not serving: no model is published") and "stored users are still answered" in said[0], said[0]
    assert said[1].startswith("serving again") and said[4].startswith("serving again")
    assert said[2].startswith("not serving: feature store") and "Milvus" in said[3]


def test_the_health_probe_exports_which_backends_it_reaches(tmp_path):
    """NOT_SERVING takes a replica out of rotation, where its ratio metrics see no traffic to alert
    on: the gauge per backend is what says why (the RecallBackendDown alert)."""
    from infra.config import load_config
    from recall_service.server import RecallServer

    store, search, models = Switchable("feature store"), Switchable("Milvus"), FakeModels(FakeModel("B", np.zeros((3, DIM), np.float32)))
    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path)})
    server = RecallServer(config, reader=store, search=search, models=models, availability=SetAvailability())

    def up() -> dict:
        return {backend: server.metrics.backend_up.labels(backend)._value.get() for backend in ("feature_store", "vector_search", "model")}

    assert server.probe() and up() == {"feature_store": 1, "vector_search": 1, "model": 1}
    search.down = True
    assert not server.probe() and up() == {"feature_store": 1, "vector_search": 0, "model": 1}
    store.down, search.down = True, False
    assert not server.probe() and up() == {"feature_store": 0, "vector_search": 1, "model": 1}
    store.down, model = False, models.model
    models.model = None  # nothing published (or nothing loadable, nothing loaded)
    assert not server.probe() and up() == {"feature_store": 1, "vector_search": 1, "model": 0}
    models.model = model
    assert server.probe() and up() == {"feature_store": 1, "vector_search": 1, "model": 1}


def test_the_counters_alerts_read_are_exported_at_zero_before_their_first_increment(tmp_path):
    """A labelled series that appears at 1 has no increase for Prometheus: a one-off failure of a kind
    would fire nothing (ModelReloadFailed, RecallHealthProbeFailing, the fallback ratios)."""
    from prometheus_client import generate_latest

    from infra.config import load_config
    from recall_service.server import RecallServer

    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path)})
    server = RecallServer(config, reader=Switchable("feature store"), search=Switchable("Milvus"), models=FakeModels(None), availability=SetAvailability())
    exported = generate_latest(server.metrics.registry).decode()
    for series in ('mindstream_recall_unexpected_errors_total{method="health_probe"} 0.0',
                   'mindstream_recall_fallbacks_total{reason="feature_store_unavailable"} 0.0',
                   'mindstream_recall_fallbacks_total{reason="unknown_user"} 0.0',
                   'mindstream_recall_served_log_dropped_total{reason="unavailable"} 0.0',
                   *(f'mindstream_recall_unexpected_errors_total{{method="{method}"}} 0.0' for method in ("Recall", "BatchRecall")),
                   *(f'mindstream_recall_requests_total{{code="{code}",method="{method}"}} 0.0' for method in ("Recall", "BatchRecall")
                     for code in ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED")),
                   *(f'mindstream_recall_latency_seconds_count{{code="{code}",path="none",stage="total"}} 0.0'
                     for code in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL"))):
        assert series in exported, series
    assert 'code="INVALID_ARGUMENT",path="none"' not in exported  # a client's mistake is counted, never timed
    assert "reason=\"none\"" not in exported  # served from stored interests is no fallback

    from streaming import metrics as stream

    exported = generate_latest().decode()
    for series in ('mindstream_stream_model_reloads_total{result="failed"}', 'mindstream_stream_dead_letters_total{reason="late"}',
                   'mindstream_stream_dead_letters_total{reason="malformed"}', 'mindstream_stream_window_seeds_total{result="unreadable"}'):
        assert series in exported, series
    assert stream.DEAD_LETTERS.labels("future")._value.get() >= 0


def test_what_a_user_whose_record_does_not_decode_has_seen_is_left_out_of_the_fallback(world):
    """The seen set is read beside the record: a record that fails to decode (another schema) still
    hands it over, with its RecordError, so the popular answer leaves it out."""
    recaller, search, store, catalogs, interests = world
    store.seen_items = 10
    store.put_many([InterestRecord("mallory", "B", np.ones((2, DIM), np.float32), ("i1",), 0, "0:2")], seen={"mallory": [(1, "i0"), (2, "i3")]})
    store.rows["mallory"][b"schema"] = b"999"
    with pytest.raises(RecordError) as failed:
        store.get_many(["mallory"])
    assert failed.value.seen == {"i0", "i3"}
    [mallory] = recaller.recall_many([q("mallory", 4)], Deadline(1.0))
    assert mallory.path is RecallPath.POPULAR_FALLBACK and mallory.reason is FallbackReason.CORRUPT_RECORD
    assert [r for r, _, _ in mallory.items] == ["i1", "i2", "i4", "i5"]  # by popularity, without i0 and i3 (its window is unreadable)


def test_what_a_user_without_a_record_has_seen_is_left_out_of_every_fallback(world):
    """A window of items the model did not know writes a seen set and no record: the user is unknown
    to the recall service, and what they saw stays out of the popular answer and of the answer from
    the request's recent items (the next published model knows those items)."""
    from streaming.feature_store import SeenOnly

    recaller, search, store, catalogs, interests = world
    store.seen_items = 10
    store.put_many([], seen={"newcomer": [(1, "i0"), (2, "i3")]})
    assert store.get_many(["newcomer", "nobody"]) == [SeenOnly("newcomer", frozenset({"i0", "i3"})), None]
    [popular] = recaller.recall_many([q("newcomer", 4)], Deadline(1.0))
    assert popular.path is RecallPath.POPULAR_FALLBACK and popular.reason is FallbackReason.UNKNOWN_USER
    assert [r for r, _, _ in popular.items] == ["i1", "i2", "i4", "i5"]  # by popularity, without i0 and i3
    [computed] = recaller.recall_many([q("newcomer", 30, recent_item_ids=["i7"])], Deadline(1.0))
    assert computed.path is RecallPath.COMPUTED_ON_THE_FLY and computed.reason is FallbackReason.UNKNOWN_USER
    assert not {"i0", "i3", "i7"} & {r for r, _, _ in computed.items} and len(computed.items) == 30


def test_the_popular_ranking_is_deep_enough_for_everything_left_out_at_once(two_exports):
    """A user known by a seen set only, with recent items and exclusions, falls back to popular items
    while Milvus is down: every item left out can be among the most popular, and n must still come."""
    from infra.config import Config, RecallServiceConfig, StreamingConfig
    from model_export.artifact import ModelArtifact
    from recall_service.backends import LoadedModel
    from recall_service.backends import default_popular_depth
    from streaming.feature_store import SeenOnly

    config = Config(recall=RecallServiceConfig(max_n=5, max_exclusions=5, max_recent_items=5), streaming=StreamingConfig(window_length=2, seen_items=8))
    model = LoadedModel(two_exports[0], prefer_gpu=False, popular_depth=default_popular_depth(config))
    artifact = ModelArtifact.load(two_exports[0])
    ranked = [artifact.raw_items[i] for i in np.argsort(-artifact.popularity, kind="stable")]
    excluded, recent, seen = ranked[:5], ranked[5:10], frozenset(ranked[10:18])  # the 18 most popular, left out at once

    class SeenOnlyReader:
        def get_many(self, user_ids):
            return [SeenOnly(u, seen) for u in user_ids]

    class DownSearch:
        def search(self, *args, **kwargs):
            raise BackendUnavailable("Milvus is down")

    query = validate("u", 5, exclude_item_ids=excluded, recent_item_ids=recent, limits=Limits.from_config(config.recall))
    result = Recaller(SeenOnlyReader(), DownSearch(), FakeModels(model)).recall_many([query], Deadline(5))[0]
    assert result.path == RecallPath.POPULAR_FALLBACK
    assert [item for item, *_ in result.items] == ranked[18:23]


def test_the_milvus_health_ping_bounds_its_retries_by_a_whole_number_of_seconds():
    """pymilvus honours only an int timeout for its retries: the probe's ping with 2.0 retried 75
    times (~211 s against a stopped Milvus) while health and backend_up still said Milvus answered."""
    from recall_service.backends import MilvusItemSearch

    asked = []

    class Client:
        def get_server_version(self, timeout):
            asked.append(timeout)

    for configured, sent in ((2.0, 2), (0.3, 1), (2.5, 3)):
        search = MilvusItemSearch("http://127.0.0.1:1", connect_timeout_s=configured)
        search.connect = lambda: Client()
        search.ping()
        assert type(asked[-1]) is int and asked[-1] == sent
