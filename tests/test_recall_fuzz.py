"""Property-based fuzzing of the recall API over gRPC, against the real server of the `stack`
fixture (real Redis, Milvus Lite, the registry's two model versions).

Every field of RecallRequest and BatchRecallRequest is drawn from values around and far beyond
its limits, filters from the filter grammar's own tokens mixed with arbitrary text, and raw bytes
(arbitrary, and protobuf wire records with arbitrary payloads: invalid UTF-8 in string fields,
64-bit varints in int32 fields, unknown fields) are sent as the serialized request. Whatever
arrives, the properties are:
  - the answer is OK or INVALID_ARGUMENT (RESOURCE_EXHAUSTED for a message over gRPC's receive
    limit); never INTERNAL, UNKNOWN, UNAVAILABLE or a timeout, and an error has a message;
  - an OK answer keeps the request's contract: at most n items, none of them excluded, each
    passing the filter as the service's own predicate reads it, one response per request of a batch;
  - the server's unexpected-error counter stays 0 and it still serves a valid request afterwards.
The first @example cases of the raw-bytes test are regressions: bytes that are not a valid message were answered INTERNAL
by gRPC's own deserializer until the server parsed requests itself (recall_service/server.py).
Run with `pytest tests/test_recall_fuzz.py` (about 10 s after the `stack` fixture is up).
"""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model_export.publish import category_fields
from recall_service.filters import parse_filter
from recall_service.query import Limits
from recall_service.stubs import SERVICE_NAME, recall_pb2

from recall_stack import STORED, WINDOW

FUZZ_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMEOUT_S = 20  # far above any answer of this stack: running into it means the server hangs
ALLOWED_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
LIMITS = Limits.from_config()  # the stack's server runs with the default [recall] limits
INT32 = st.integers(-(2**31), 2**31 - 1)


def around(limit: int) -> st.SearchStrategy[int]:
    """Integers at and next to 0 and a limit, plus any int32."""
    return st.one_of(st.integers(-2, 3), st.integers(limit - 2, limit + 2), INT32)


def repeated(text: str) -> st.SearchStrategy[str]:
    """`text` repeated to a length around the id limit (256 characters) and far beyond it."""
    return st.integers(250, 70_000).map(lambda k: (text * k)[:k])


# Two kinds of request. `any_requests` draws every field anywhere, mostly past its limits, and
# is refused at the first bad field. `well_formed_requests` keeps every field within its limits
# but draws the content freely (odd unicode ids, unknown users and items, filters of the grammar
# with arbitrary string literals), so that it reaches the feature store, the user tower, Milvus
# and the merges on every path.
utf8 = st.characters(codec="utf-8")  # NUL, astral planes, right-to-left and combining marks included
CATALOG_IDS = [f"i{k}" for k in range(60)]
CATEGORIES = [f"item_genre=g{k}|item_genre=gx" for k in range(4)]  # the synthetic catalog's side tokens, as published
user_ids = st.one_of(st.sampled_from(["user-new", "user-old", "newcomer", "", "\x00", "\u202euser-new", "user-new\u0301"]),
                     st.text(utf8, max_size=40), repeated("u"))
item_ids = st.one_of(st.sampled_from(CATALOG_IDS + ["", "never-seen", "\U0001f600"]), st.text(utf8, max_size=40), repeated("x"))
well_formed_user_ids = st.one_of(st.sampled_from(["user-new", "user-old", "newcomer"]), st.text(utf8, min_size=1, max_size=256))
well_formed_item_ids = st.one_of(st.sampled_from(CATALOG_IDS), st.text(utf8, min_size=1, max_size=256))


def id_lists(limit: int) -> st.SearchStrategy[list[str]]:
    short = st.lists(item_ids, max_size=12)
    at_limit = st.integers(limit - 2, limit + 2).map(lambda k: [f"i{j % 60}" for j in range(k)])
    return st.one_of(short, short, at_limit)


def quoted(text: str, quote: str) -> str:
    """A string literal of the grammar, which has no escapes: the quote itself cannot occur inside."""
    return quote + text.replace(quote, "") + quote


# Filters of the grammar: comparisons with catalog or arbitrary strings (the grammar refuses
# control characters below 32 in them), combined at random.
literal_text = st.one_of(st.sampled_from(CATEGORIES + ["item_genre=g1", "item_genre=gx", ""]), st.text(st.characters(codec="utf-8", min_codepoint=32), max_size=16))
literals = st.builds(quoted, literal_text, st.sampled_from('"\''))
comparisons = st.one_of(
    st.builds("category {} {}".format, st.sampled_from(["==", "!="]), literals),
    st.builds(lambda text, wildcard, quote: f"category like {quoted(text + wildcard, quote)}", literal_text, st.sampled_from(["%", ""]), st.sampled_from('"\'')),
    st.builds(lambda negated, values: f"category {'not ' if negated else ''}in [{', '.join(values)}]", st.booleans(), st.lists(literals, min_size=1, max_size=4)),
    st.builds("category contains {}".format, literals),
    st.builds("active {} {}".format, st.sampled_from(["==", "!="]), st.sampled_from(["true", "false", "TRUE"])),
)
grammar_filters = st.recursive(comparisons, lambda inner: st.one_of(
    st.builds("{} {} {}".format, inner, st.sampled_from(["and", "or", "&&", "||", "AND"]), inner),
    st.builds("{}({})".format, st.sampled_from(["", "not ", "!", "NOT"]), inner),
), max_leaves=10)
# Anything near the grammar: its tokens in random order, arbitrary text, deep nesting, lengths
# around the limit.
GRAMMAR_TOKENS = ["category", "active", "==", "!=", "=", "like", "in", "contains", "not", "and", "or", "&&", "||", "!", "(", ")", "[", "]", ",",
                  "true", "false", "nosuch", '"%"', '"%g1"', '""', "''", '"', "'", "\\", "%", "_", "0", "1e9", "\x00"]
token_sentences = st.tuples(st.lists(st.one_of(st.sampled_from(GRAMMAR_TOKENS), literals), max_size=24), st.sampled_from([" ", "", "\t", "\u3000"])).map(
    lambda t: t[1].join(t[0]))
nested = st.tuples(st.integers(0, 40), st.sampled_from(["(", "not (", "!("])).map(lambda t: t[1] * t[0] + "active == true" + ")" * t[0])
filters = st.one_of(grammar_filters, token_sentences, token_sentences, nested, st.text(utf8, max_size=80),
                    st.integers(LIMITS.max_filter_chars - 4, LIMITS.max_filter_chars + 4).map(lambda k: ("active == true or " * k)[:k]))

any_requests = st.builds(
    recall_pb2.RecallRequest,
    user_id=user_ids,
    n=around(LIMITS.max_n),
    exclude_item_ids=id_lists(LIMITS.max_exclusions),
    recent_item_ids=id_lists(LIMITS.max_recent_items),
    filter=filters,
    per_interest_n=around(LIMITS.max_per_interest_n),
    merge_policy=st.one_of(st.sampled_from([0, 1, 2, 3, -1]), INT32),  # proto3 enums are open: unknown values arrive as numbers
)


def well_formed_requests(max_ids: int) -> st.SearchStrategy[recall_pb2.RecallRequest]:
    return st.builds(
        recall_pb2.RecallRequest,
        user_id=well_formed_user_ids,
        n=st.one_of(st.integers(1, 20), st.integers(1, LIMITS.max_n)),
        exclude_item_ids=st.lists(well_formed_item_ids, max_size=max_ids),
        recent_item_ids=st.lists(well_formed_item_ids, max_size=max_ids),
        filter=st.one_of(st.just(""), grammar_filters),
        per_interest_n=st.one_of(st.just(0), st.integers(0, LIMITS.max_per_interest_n)),
        merge_policy=st.integers(0, 2),
    )


recall_requests = st.one_of(well_formed_requests(max_ids=20), any_requests)
batches = st.one_of(st.lists(well_formed_requests(max_ids=4), max_size=70), st.lists(st.one_of(well_formed_requests(max_ids=4), any_requests), max_size=8)).map(
    lambda requests: recall_pb2.BatchRecallRequest(requests=requests))


# The protobuf wire format, written by hand so that payloads the Python classes would refuse to
# build (invalid UTF-8 in a string field, a 64-bit varint in an int32 field) reach the server.
def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wire_field(number: int, payload: bytes | int) -> bytes:
    """A varint record for an int, a length-delimited one for bytes."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


wire_requests = st.lists(st.one_of(
    st.builds(wire_field, st.integers(1, 9), st.binary(max_size=40)),  # 1, 3, 4, 5: strings; 9: unknown
    st.builds(wire_field, st.integers(1, 9), st.integers(0, 2**64 - 1)),
    st.binary(max_size=12),  # truncated or garbled records
), max_size=8).map(b"".join)
wire_batches = st.lists(st.one_of(st.builds(wire_field, st.just(1), wire_requests), st.binary(max_size=12)), max_size=8).map(b"".join)


def unexpected_errors(stack) -> float:
    return sum(s.value for m in stack.server.metrics.unexpected.collect() for s in m.samples if s.name.endswith("_total"))


def call(stack, method: str, request: bytes):
    """The RPC with identity (de)serializers: the request goes out byte for byte as given."""
    rpc = stack.channel.unary_unary(f"/{SERVICE_NAME}/{method}", request_serializer=None, response_deserializer=None)
    try:
        return grpc.StatusCode.OK, rpc(request, timeout=TIMEOUT_S), ""
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details() or ""


def assert_answered_or_refused(stack, method: str, request: bytes):
    """The properties every answer must have; returns the code and the parsed response, or the
    error's message."""
    code, raw, details = call(stack, method, request)
    assert code == grpc.StatusCode.OK or code in ALLOWED_ERRORS, f"{method}: {code.name} {details!r}"
    assert code == grpc.StatusCode.OK or details.strip(), f"{method}: {code.name} without a message"
    assert unexpected_errors(stack) == 0
    if code is not grpc.StatusCode.OK:
        return code, details
    response_class = recall_pb2.RecallResponse if method == "Recall" else recall_pb2.BatchRecallResponse
    return code, response_class.FromString(raw)


def assert_keeps_the_contract(stack, request, response):
    """At most n items, none excluded, and each passes the filter as the service's own predicate
    reads it (Milvus and the popular fallback must agree with it, whatever the literals hold)."""
    assert len(response.items) <= request.n
    assert not {i.item_id for i in response.items} & set(request.exclude_item_ids)
    item_filter = parse_filter(request.filter)
    if item_filter is not None and response.items:
        artifact = stack.artifacts[response.model_version]
        for item in response.items:
            category = category_fields(artifact.item_side[artifact.item_index[item.item_id] - 1])
            assert item_filter.matches(*category, True), f"{item.item_id} ({category}) does not pass {request.filter!r}"


def assert_still_serving(stack):
    assert unexpected_errors(stack) == 0
    response = stack.recall(user_id="user-new", n=5)
    assert response.path == STORED and len(response.items) == 5 and not set(WINDOW) & {i.item_id for i in response.items}


def test_recall_requests_are_answered_or_refused_with_a_message(stack):
    @FUZZ_SETTINGS
    @given(recall_requests)
    @example(recall_pb2.RecallRequest(user_id="user-new", n=5, filter='category like "\U0010ffff%"'))  # no prefix successor exists
    @example(recall_pb2.RecallRequest(user_id="user-new", n=5, merge_policy=-(2**31)))
    @example(recall_pb2.RecallRequest(user_id="u" * 70_000, n=5, exclude_item_ids=["x" * 256] * 5000))  # over max_request_bytes
    def property_holds(request):
        code, answer = assert_answered_or_refused(stack, "Recall", request.SerializeToString())
        if code is grpc.StatusCode.OK:
            assert_keeps_the_contract(stack, request, answer)
            answered["filtered"] += bool(request.filter and answer.items)
            answered["excluding"] += bool(request.exclude_item_ids and answer.items)
        else:
            assert code is grpc.StatusCode.INVALID_ARGUMENT, answer  # no RecallRequest built here is over 4 MiB

    answered = {"filtered": 0, "excluding": 0}
    property_holds()
    # a service that refused every filter or exclusion would keep the contract vacuously
    assert answered["filtered"] > 0 and answered["excluding"] > 0, answered
    assert_still_serving(stack)


def test_batches_are_answered_in_order_or_refused_naming_the_request(stack):
    @FUZZ_SETTINGS
    @given(batches)
    @example(recall_pb2.BatchRecallRequest())  # no request at all: an empty answer
    @example(recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id="a", n=1)] * 65))
    def property_holds(batch):
        code, answer = assert_answered_or_refused(stack, "BatchRecall", batch.SerializeToString())
        if code is grpc.StatusCode.OK:
            assert len(answer.responses) == len(batch.requests) <= LIMITS.max_batch
            for request, response in zip(batch.requests, answer.responses):
                assert_keeps_the_contract(stack, request, response)
        else:
            assert answer.startswith(("requests", "request:")), answer

    property_holds()
    assert_still_serving(stack)


def test_raw_bytes_are_answered_or_refused_with_a_message(stack):
    @FUZZ_SETTINGS
    @given(st.sampled_from(["Recall", "BatchRecall"]), st.one_of(st.binary(max_size=200), wire_requests, wire_batches))
    # regressions: each of these three was INTERNAL "Exception deserializing request!"
    @example("Recall", wire_field(1, b"\xff\xfe user"))  # user_id that is not UTF-8
    @example("BatchRecall", wire_field(1, wire_field(5, b"\xc3(")))  # a nested request's filter that is not UTF-8
    @example("Recall", b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end of the message
    @example("Recall", wire_field(2, 2**63) + wire_field(1, b"user-new"))  # n wider than int32: read as its low 32 bits (0), refused
    def property_holds(method, request):
        assert_answered_or_refused(stack, method, request)

    property_holds()
    assert_still_serving(stack)


def test_a_message_over_the_receive_limit_is_resource_exhausted(stack):
    limit = 4 * stack.config.recall.max_request_bytes  # the server's grpc.max_receive_message_length
    request = recall_pb2.RecallRequest(user_id="user-new", n=5, filter="x" * (limit + 1)).SerializeToString()
    code, details = assert_answered_or_refused(stack, "Recall", request)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and details
    assert_still_serving(stack)
