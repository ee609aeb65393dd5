"""A recall request as the service's pure logic sees it, validated against the configured limits.

`validate` turns the fields of a request (plain Python values: the gRPC layer unpacks the proto,
tests call it directly) into a `RecallQuery` or raises `InvalidRequest` with a message naming the
field and the limit, which the server returns as INVALID_ARGUMENT. Nothing past this point checks
input again.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Set as AbstractSet
from dataclasses import dataclass

from infra.config import RecallServiceConfig
from recall_service.filters import FilterError, ItemFilter, parse_filter
from streaming.events import ID_CONTROL_CHARACTERS, MAX_ID_CHARS  # ids as events carry them: no other user or item exists

_ID_CONTROL = re.compile(ID_CONTROL_CHARACTERS)


class InvalidRequest(ValueError):
    """The request breaks the API contract; the message says which field and how. `requests`: the
    positions in the call of the requests it concerns, when found past validation (a filter the
    vector store refused), for a BatchRecall's message to name them."""

    def __init__(self, message: str, requests: tuple[int, ...] = ()):
        super().__init__(message)
        self.requests = requests


class MergePolicy(enum.Enum):
    MAX_SCORE = 1
    QUOTA = 2


class RecallPath(enum.Enum):
    STORED_INTERESTS = 1
    COMPUTED_ON_THE_FLY = 2
    POPULAR_FALLBACK = 3


class FallbackReason(enum.Enum):
    NONE = 0
    UNKNOWN_USER = 1
    FEATURE_STORE_UNAVAILABLE = 2
    VECTOR_SEARCH_UNAVAILABLE = 3
    STORED_VERSION_RETIRED = 4
    CORRUPT_RECORD = 5
    NO_KNOWN_RECENT_ITEMS = 6


@dataclass(frozen=True)
class Limits:
    max_n: int
    max_per_interest_n: int
    max_exclusions: int
    max_recent_items: int
    max_filter_chars: int
    max_batch: int

    @classmethod
    def from_config(cls, recall_config: RecallServiceConfig | None = None) -> "Limits":
        """The limits of [recall]; its defaults when none is given."""
        recall_config = recall_config or RecallServiceConfig()
        return cls(**{name: getattr(recall_config, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RecallQuery:
    user_id: str
    n: int
    excluded: frozenset[str]  # the request's exclusions (the window and seen set are added per path)
    recent_items: tuple[str, ...]  # oldest first
    item_filter: ItemFilter | None
    per_interest_n: int  # 0 = n (see per_interest_limit)
    merge_policy: MergePolicy

    def left_out(self, *also: Iterable[str]) -> frozenset[str]:
        """What the answer must not hold: the request's exclusions and `also` (a window, a seen set)."""
        return self.excluded.union(*also)

    def per_interest_limit(self, left_out: AbstractSet[str], cap: int) -> int:
        """Candidates to fetch per interest, given `left_out(...)`, every item the answer leaves out:
        per_interest_n (default n) + |left_out|, capped. By default an item of the exact top n by best
        score ranks at most n + |left_out| in the list of the interest that scores it best; a
        per_interest_n of the client's counts the candidates kept after the window and seen items,
        which it cannot see (taken from a list of per_interest_n they left it short, even empty)."""
        return min(cap, (self.per_interest_n or self.n) + len(left_out))


def _check_ids(field: str, ids, limit: int) -> None:
    if len(ids) > limit:
        raise InvalidRequest(f"{field}: {len(ids)} ids, at most {limit}")
    for i, item in enumerate(ids):
        if not item or len(item) > MAX_ID_CHARS or _ID_CONTROL.search(item):
            raise InvalidRequest(f"{field}[{i}]: an item id must have 1..{MAX_ID_CHARS} characters, no control characters (U+0000-U+001F, U+007F)")


def validate(
    user_id: str,
    n: int,
    exclude_item_ids=(),
    recent_item_ids=(),
    filter_text: str = "",
    per_interest_n: int = 0,
    merge_policy: int = 0,
    limits: Limits | None = None,
) -> RecallQuery:
    limits = limits or Limits.from_config()
    if not user_id or len(user_id) > MAX_ID_CHARS or _ID_CONTROL.search(user_id):  # as events name users: no other user exists
        raise InvalidRequest(f"user_id: must have 1..{MAX_ID_CHARS} characters, no control characters (U+0000-U+001F, U+007F)")
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest(f"n: {n} is out of range; ask for 1..{limits.max_n} items")
    if not 0 <= per_interest_n <= limits.max_per_interest_n:
        raise InvalidRequest(f"per_interest_n: {per_interest_n} is out of range; use 0 (automatic) or 1..{limits.max_per_interest_n}")
    _check_ids("exclude_item_ids", exclude_item_ids, limits.max_exclusions)
    _check_ids("recent_item_ids", recent_item_ids, limits.max_recent_items)
    try:
        item_filter = parse_filter(filter_text, limits.max_filter_chars)
    except FilterError as exc:
        raise InvalidRequest(str(exc)) from None
    if merge_policy == 0:
        policy = MergePolicy.MAX_SCORE
    else:
        try:
            policy = MergePolicy(merge_policy)
        except ValueError:
            raise InvalidRequest(f"merge_policy: unknown value {merge_policy}; use MERGE_POLICY_MAX_SCORE or MERGE_POLICY_QUOTA") from None
    return RecallQuery(user_id, n, frozenset(exclude_item_ids), tuple(recent_item_ids), item_filter, per_interest_n, policy)
