"""The item filter of a recall request: a small, validated subset of Milvus boolean expressions.

    expr       := term (("or" | "||") term)*
    term       := factor (("and" | "&&") factor)*
    factor     := ("not" | "!") factor | "(" expr ")" | comparison
    comparison := category ("==" | "!=") STRING | category like STRING | category [not] in [STRING, ...]
                | category contains STRING | active ("==" | "!=") (true | false)

Strings are double- or single-quoted (no escapes: a string cannot hold its own quote). `like`
takes an exact string or a prefix ("Comedy%", the only `%` allowed is the last character) and is
compiled to a string range, `category >= "Comedy" and category < "Comedz"`: Milvus' own LIKE
differs between versions (2.3 accepts prefixes only and reads `_` literally, Milvus Lite reads it
as a wildcard), a range means the same everywhere. A parsed filter gives two equivalent forms:
the canonical Milvus expression (the only text ever sent to Milvus: the request's own text never
is) and a Python predicate over (category, categories, active), which the popular fallback
evaluates. `category` is the item's side tokens joined by "|" (e.g. "Comedy|Romance"), so ==, like
and in compare the whole list; `contains` tests one token (`array_contains` on the `categories`
array field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from model_export.publish import milvus_string

MAX_DEPTH = 32  # nesting of not / parentheses: bounds the recursion of the parser

TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"[^"]*"|'[^']*')
      | (?P<op>==|!=|&&|\|\||!|\(|\)|\[|\]|,)
      | (?P<word>[A-Za-z_][A-Za-z_0-9]*)
    )""",
    re.VERBOSE,
)
KEYWORDS = frozenset(("and", "or", "not", "in", "like", "contains", "true", "false"))
ALIASES = {"&&": "and", "||": "or", "!": "not"}


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` (None: there is none)."""
    while prefix and prefix[-1] == chr(0x10FFFF):
        prefix = prefix[:-1]
    if not prefix:
        return None
    following = ord(prefix[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters
        following = 0xE000
    return prefix[:-1] + chr(following)


class FilterError(ValueError):
    """The filter is not in the accepted grammar; the message says where and what is expected."""


@dataclass(frozen=True)
class ItemFilter:
    milvus_expr: str  # canonical Milvus boolean expression
    matches: Callable[[str, tuple[str, ...], bool], bool]  # (category, categories, active) -> keep?


Predicate = Callable[[str, tuple[str, ...], bool], bool]


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, position) with kind in string / op / keyword / name."""
    out, pos, end = [], 0, len(text.rstrip())  # positions, not slices: a slice per token made long filters quadratic
    while pos < end:
        m = TOKEN.match(text, pos)
        if not m:
            at = pos + len(text[pos:end]) - len(text[pos:end].lstrip())
            raise FilterError(f"filter: unexpected character {text[at]!r} at position {at}")
        kind, value, start = m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)
        if kind == "word":
            lowered = value.lower()
            kind, value = ("keyword", lowered) if lowered in KEYWORDS else ("name", value)
        elif kind == "op" and value in ALIASES:
            kind, value = "keyword", ALIASES[value]
        elif kind == "string":
            value = value[1:-1]
            if any(ord(c) < 32 for c in value):
                raise FilterError(f"filter: control characters are not allowed in strings (at position {start})")
        out.append((kind, value, start))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            wanted = repr(value) if value else {"name": "a field (category or active)", "string": "a quoted string", "op": "an operator", "keyword": "true or false"}[kind]
            found = f"{token[1]!r} at position {token[2]}" if token else "the end of the filter"
            raise FilterError(f"filter: expected {wanted}, found {found}")
        self.i += 1
        return token[1]

    def at(self, kind: str, value: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == kind and token[1] == value

    def expr(self, depth: int) -> tuple[str, Predicate]:
        return self._chain("or", self.term, depth, any)

    def term(self, depth: int) -> tuple[str, Predicate]:
        return self._chain("and", self.factor, depth, all)

    def _chain(self, keyword: str, operand, depth: int, combine) -> tuple[str, Predicate]:
        """operand (keyword operand)*: `or` of terms, `and` of factors."""
        parts = [operand(depth)]
        while self.at("keyword", keyword):
            self.i += 1
            parts.append(operand(depth))
        if len(parts) == 1:
            return parts[0]
        predicates = [p for _, p in parts]
        return f" {keyword} ".join(e for e, _ in parts), lambda c, t, a: combine(p(c, t, a) for p in predicates)

    def factor(self, depth: int) -> tuple[str, Predicate]:
        if depth >= MAX_DEPTH:
            raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels")
        if self.at("keyword", "not"):
            self.i += 1
            inner, pred = self.factor(depth + 1)
            return f"not ({inner})", lambda c, t, a: not pred(c, t, a)
        if self.at("op", "("):
            self.i += 1
            inner, pred = self.expr(depth + 1)
            self.take("op", ")")
            return f"({inner})", pred
        return self.comparison()

    def comparison(self) -> tuple[str, Predicate]:
        token = self.peek()
        field = self.take("name")
        if field == "active":
            op = self.take("op")
            if op not in ("==", "!="):
                raise FilterError(f"filter: active takes == or !=, found {op!r}")
            value = self.take("keyword")
            if value not in ("true", "false"):
                raise FilterError(f"filter: active compares with true or false, found {value!r}")
            want = (value == "true") == (op == "==")
            return f"active == {str(want).lower()}", lambda c, t, a: a == want
        if field != "category":
            raise FilterError(f"filter: unknown field {field!r} at position {token[2]}; fields: category, active")
        if self.at("keyword", "contains"):
            self.i += 1
            member = self.take("string")
            return f"array_contains(categories, {milvus_string(member)})", lambda c, t, a: member in t
        if self.at("keyword", "like"):
            self.i += 1
            pattern = self.take("string")
            prefix = pattern[:-1] if pattern.endswith("%") else None
            if "%" in (pattern if prefix is None else prefix):
                raise FilterError(f'filter: like takes an exact string or a prefix pattern like "Comedy%", found {pattern!r}')
            if prefix is None:
                return f"category == {milvus_string(pattern)}", lambda c, t, a: c == pattern
            upper = _successor(prefix)
            expr = f"category >= {milvus_string(prefix)}" + (f" and category < {milvus_string(upper)}" if upper is not None else "")
            return f"({expr})", lambda c, t, a: c.startswith(prefix)
        negated = self.at("keyword", "not")
        if negated:
            self.i += 1
        if self.at("keyword", "in"):
            self.i += 1
            self.take("op", "[")
            values = [self.take("string")]
            while self.at("op", ","):
                self.i += 1
                values.append(self.take("string"))
            self.take("op", "]")
            members = frozenset(values)
            listed = ", ".join(milvus_string(v) for v in values)
            if negated:
                return f"not (category in [{listed}])", lambda c, t, a: c not in members
            return f"category in [{listed}]", lambda c, t, a: c in members
        if negated:
            raise FilterError("filter: `not` after a field must be followed by `in`")
        op = self.take("op")
        if op not in ("==", "!="):
            raise FilterError(f"filter: category takes ==, !=, like, in or contains, found {op!r}")
        value = self.take("string")
        if op == "==":
            return f"category == {milvus_string(value)}", lambda c, t, a: c == value
        return f"category != {milvus_string(value)}", lambda c, t, a: c != value


def parse_filter(text: str, max_chars: int = 1024) -> ItemFilter | None:
    """The validated filter, or None for an empty one; FilterError says what is wrong."""
    if len(text) > max_chars:
        raise FilterError(f"filter: {len(text)} characters, at most {max_chars}")
    if not text.strip():
        return None
    parser = _Parser(text)
    expr, predicate = parser.expr(0)
    if parser.peek() is not None:
        kind, value, pos = parser.peek()
        raise FilterError(f"filter: unexpected {value!r} at position {pos}")
    return ItemFilter(expr, predicate)
