import re

import numpy as np
import pandas as pd
import pytest

from model_export.data import (
    DatasetError,
    evaluation_cases,
    gather_histories,
    load_dataset,
    load_sequence_file,
    load_table,
    preprocess,
    training_positions,
)


def _load(path, tmp_path, seed=2019):
    return load_dataset(str(path), tmp_path / "data", tmp_path / "cache", tmp_path / "shared", split_seed=seed)


def _sequence_data(tmp_path, lines):
    path = tmp_path / "seq.txt"
    path.write_text("\n".join(lines) + "\n")
    return preprocess(load_sequence_file(path), "t", split_seed=1)


def test_five_core_filter_items_then_users(tmp_path):
    # i_rare appears 4 times and x once (both dropped); u_short then has 4 items left (dropped).
    lines = [*(f"u{u} a b c d e i_rare" for u in range(1, 5)), *(f"u{u} a b c d e" for u in range(5, 9)), "u_short a b c d x"]
    data = _sequence_data(tmp_path, lines)
    assert "i_rare" not in set(data.item_ids)
    assert set(data.user_ids) == {f"u{u}" for u in range(1, 9)}
    assert data.n_items == 5 and data.item_ids[0] == "<pad>"


def test_five_core_filter_repeats_until_items_and_users_both_have_five(tmp_path):
    # One pass keeps f (5 interactions) and then drops u_f (1 item left once r1..r4 are gone): f is left
    # with 4 interactions, so a second pass must drop it.
    lines = [*(f"u{u} a b c d e f" for u in range(1, 5)), *(f"u{u} a b c d e" for u in range(5, 9)), "u_f f r1 r2 r3 r4"]
    data = _sequence_data(tmp_path, lines)
    assert "f" not in set(data.item_ids) and "u_f" not in set(data.user_ids)
    assert data.item_counts(np.arange(data.n_users))[1:].min() >= 5
    assert np.diff(data.seq_offsets).min() >= 5


def test_too_few_users_for_every_split_is_a_clear_error(tmp_path):
    # 6 users split 80/10/10 round to 5/1/0: no test user, and evaluation would fail much later.
    with pytest.raises(DatasetError, match=r"t: 6 users are left after the 5-core filter, split 5/1/0 .*"
                                           r"each split needs at least one user: bring more users \(at least 8 "):
        _sequence_data(tmp_path, [f"u{u} a b c d e" for u in range(6)])


def test_split_is_disjoint_deterministic_and_80_10_10(synthetic_csv, tmp_path):
    data = _load(synthetic_csv, tmp_path)
    train, valid, test = map(set, (data.train_users, data.valid_users, data.test_users))
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(train | valid | test) == data.n_users
    assert abs(len(train) / data.n_users - 0.8) < 0.02
    again = _load(synthetic_csv, tmp_path / "other")
    assert np.array_equal(again.test_users, data.test_users)
    other_seed = _load(synthetic_csv, tmp_path / "seeded", seed=7)
    assert not np.array_equal(other_seed.test_users, data.test_users)


def test_no_held_out_user_leaks_into_training(synthetic_csv, tmp_path, monkeypatch):
    """What a real training run reads: every sequence it trains on and every count it samples
    negatives from belong to training users."""
    import model_export.train as train_module

    data = _load(synthetic_csv, tmp_path)
    held_out = set(data.valid_users.tolist()) | set(data.test_users.tolist())
    trained_on, counted = set(), []
    gather = train_module.gather_histories

    def spy_gather(data_, users, ends, maxlen):
        trained_on.update(users.tolist())
        return gather(data_, users, ends, maxlen)

    counts = type(data).item_counts

    def spy_counts(self, users):
        counted.append(set(users.tolist()))
        return counts(self, users)

    monkeypatch.setattr(train_module, "gather_histories", spy_gather)
    monkeypatch.setattr(type(data), "item_counts", spy_counts)
    config = train_module.TrainConfig(dataset=str(synthetic_csv), model="mind", epochs=1, batch_size=64)
    train_module.train(config, train_module.default_spec("mind", data, str(synthetic_csv)), data, tmp_path / "run", progress=False)
    assert trained_on and trained_on <= set(data.train_users.tolist()) and not trained_on & held_out
    assert counted and all(c == set(data.train_users.tolist()) for c in counted)  # MostPop's and the sampler's popularity


def test_sequences_are_time_ordered_and_histories_precede_targets(synthetic_csv, tmp_path):
    data = _load(synthetic_csv, tmp_path)
    for u in range(data.n_users):
        times = data.seq_times[data.seq_offsets[u] : data.seq_offsets[u + 1]]
        assert np.all(np.diff(times) >= 0)
    users, positions = training_positions(data, data.train_users[:3], min_history=1)
    hist, lengths = gather_histories(data, users, positions, maxlen=4)
    for b in range(len(users)):
        seq = data.sequence(users[b])
        expected = seq[max(0, positions[b] - 4) : positions[b]]
        assert lengths[b] == len(expected)
        assert np.array_equal(hist[b, : lengths[b]], expected)
        assert np.all(hist[b, lengths[b] :] == 0)  # right padding


def test_evaluation_uses_first_80_percent_as_history_and_all_the_rest_as_targets(synthetic_csv, tmp_path):
    data = _load(synthetic_csv, tmp_path)
    cases = evaluation_cases(data, data.test_users, maxlen=50)
    for i, u in enumerate(data.test_users):
        seq = data.sequence(u)
        split = int(len(seq) * 0.8)
        assert np.array_equal(cases.history[i, : cases.lengths[i]], seq[:split])
        assert np.array_equal(cases.targets_of(i), seq[split:])


def test_side_features_and_profile_are_loaded_from_a_table(synthetic_csv, tmp_path):
    data = _load(synthetic_csv, tmp_path)
    assert list(data.profile_fields) == ["gender"]
    assert data.profile_cardinalities.tolist() == [3]  # unknown + F + M
    assert (data.item_side > 0).sum(1)[1:].min() == 2  # every item has its cluster genre and gx
    assert "item_genre=gx" in set(data.side_vocab)


def test_the_cache_tells_a_table_from_a_sequence_file_with_the_same_bytes(synthetic_csv, tmp_path):
    as_text = tmp_path / synthetic_csv.with_suffix(".txt").name
    as_text.write_bytes(synthetic_csv.read_bytes())
    assert _load(synthetic_csv, tmp_path).n_users > 0
    # Read as a sequence file (one user per line), the CSV's lines are malformed: not the CSV's cached dataset.
    with pytest.raises(DatasetError, match=r"interactions\.txt:1: expected 'user_id item_1 \.\.\. item_n'"):
        _load(as_text, tmp_path)


def test_concurrent_cache_writers_do_not_collide(synthetic_csv, tmp_path, monkeypatch):
    """Two torchrun ranks write the same cold cache entry at once: the second finishes while the first
    is still writing, and the first must still find its own temporary file to rename."""
    data = _load(synthetic_csv, tmp_path)
    cache = tmp_path / "ranks" / "entry.npz"
    real_savez = np.savez
    other_rank = []

    def savez_while_another_rank_writes(file, **arrays):
        real_savez(file, **arrays)
        if not other_rank:
            other_rank.append(True)
            data.save(cache)

    monkeypatch.setattr(np, "savez", savez_while_another_rank_writes)
    data.save(cache)
    assert [p.name for p in cache.parent.iterdir()] == ["entry.npz"]
    assert np.array_equal(type(data).load(cache).seq_items, data.seq_items)


def test_a_failed_cache_write_leaves_no_temporary_file(synthetic_csv, tmp_path, monkeypatch):
    data = _load(synthetic_csv, tmp_path)
    real_savez = np.savez

    def savez_then_disk_full(file, **arrays):
        real_savez(file, **arrays)
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        data.save(tmp_path / "failed" / "entry.npz")
    assert list((tmp_path / "failed").iterdir()) == []


def test_cache_round_trip(synthetic_csv, tmp_path, monkeypatch):
    import model_export.data as data_module

    first = _load(synthetic_csv, tmp_path)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("the second load preprocessed the file again instead of reading the cache")

    monkeypatch.setattr(data_module, "preprocess", not_again)
    second = _load(synthetic_csv, tmp_path)
    for key, value in first.__dict__.items():
        assert np.array_equal(np.asarray(value), np.asarray(getattr(second, key))), key


def test_the_fingerprint_names_the_data_not_the_way_it_was_made(synthetic_csv, tmp_path, monkeypatch):
    """Trained runs are checked against the dataset's fingerprint: a new preprocessing version that
    gives the same arrays (a new cache entry) must keep them valid; other data must not."""
    import model_export.data as data_module

    first = _load(synthetic_csv, tmp_path)
    monkeypatch.setattr(data_module, "PREPROCESS_VERSION", data_module.PREPROCESS_VERSION + 1)
    again = _load(synthetic_csv, tmp_path)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and again.fingerprint == first.fingerprint
    assert _load(synthetic_csv, tmp_path, seed=2020).fingerprint != first.fingerprint  # another split
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(synthetic_csv.read_text().splitlines(keepends=True)[:-1]))  # one interaction less
    assert _load(fewer, tmp_path).fingerprint != first.fingerprint


def test_malformed_sequence_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("u1 1 2 3\nlonely\n")
    with pytest.raises(DatasetError, match=r"bad\.txt:2"):
        _load(path, tmp_path)


def test_malformed_table_names_file_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"user": ["a", "b"], "item": ["x", "y"], "timestamp": ["1", "yesterday"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"bad\.csv:3: timestamp 'yesterday'"):
        _load(path, tmp_path)
    missing = tmp_path / "nocol.csv"
    pd.DataFrame({"user": ["a"], "thing": ["x"], "timestamp": [1]}).to_csv(missing, index=False)
    with pytest.raises(DatasetError, match="no item column"):
        _load(missing, tmp_path)


def test_sequence_file_refuses_a_user_on_two_lines_and_bytes_that_are_not_utf8(tmp_path):
    # Items are ordered by their place on the line: a user's second line would interleave with the first.
    twice = tmp_path / "twice.txt"
    twice.write_text("A a b c\nB x y\nA d e f\n")
    with pytest.raises(DatasetError, match=r"twice\.txt:3: user 'A' already has line 1"):
        load_sequence_file(twice)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"u1 a b\nu2 c \xff d\n")
    with pytest.raises(DatasetError, match=r"binary\.txt:2: not UTF-8"):
        load_sequence_file(binary)


@pytest.mark.parametrize("value, says", [
    ("1.9", "is not a whole number"), ("inf", "is not a whole number"),
    # outside an event's event_time_ms: trained on, then refused in every event a replay sends
    ("1e30", "is outside 0 <= t < 2\\^53"), ("-1e19", "is outside 0 <= t < 2\\^53"), ("-1000", "is outside 0 <= t < 2\\^53"),
    ("1700000000000000001", "is outside 0 <= t < 2\\^53"),  # nanoseconds
])
def test_table_refuses_timestamps_that_are_not_whole_numbers_an_event_can_carry(tmp_path, value, says):
    # Blank lines do not shift the line named (pandas skips them when it numbers rows).
    path = tmp_path / "times.csv"
    path.write_text(f"user,item,timestamp\n\nu1,i1,1\n\nu1,i2,{value}\n")
    with pytest.raises(DatasetError, match=rf"times\.csv:5: timestamp '{value}' {says}"):
        load_table(path)


def test_table_keeps_whole_timestamps_exactly(tmp_path):
    largest = tmp_path / "largest.csv"  # up to an event's limit, 2**53 - 1, also read through float64 (one "1.0" in the column)
    largest.write_text("user,item,timestamp\nu1,i1,9007199254740991\nu1,i2,9007199254740990\nu1,i3,1.0\n")
    assert load_table(largest).frame["ts"].tolist() == [9007199254740991, 9007199254740990, 1]
    unsigned = tmp_path / "unsigned.parquet"
    pd.DataFrame({"user": ["u1", "u1"], "item": ["a", "b"], "timestamp": np.array([2**53 - 1, 2**53 - 2], dtype=np.uint64)}).to_parquet(unsigned)
    assert load_table(unsigned).frame["ts"].tolist() == [2**53 - 1, 2**53 - 2]
    written_as_floats = tmp_path / "floats.csv"
    written_as_floats.write_text("user,item,timestamp\nu1,i1,978300760.0\nu1,i2,978300761\n")
    assert load_table(written_as_floats).frame["ts"].tolist() == [978300760, 978300761]


def test_parquet_nulls_are_refused_by_row(tmp_path):
    path = tmp_path / "nulls.parquet"
    pd.DataFrame({"user": ["a", None], "item": ["x", "y"], "timestamp": [1, 2]}).to_parquet(path)
    with pytest.raises(DatasetError, match=r"nulls\.parquet, row 2: empty user"):
        load_table(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("column", ["user", "item", "timestamp"])
def test_a_missing_required_value_is_refused_by_row(tmp_path, suffix, column):
    path = tmp_path / f"gaps{suffix}"
    table = pd.DataFrame({"user": ["a", "b", "c"], "item": ["x", "y", "z"], "timestamp": [1, 2, 3]})
    table[column] = table[column].astype(object)
    table.loc[1, column] = None
    table.to_parquet(path) if suffix == ".parquet" else table.to_csv(path, index=False)
    where = r"gaps\.parquet, row 2" if suffix == ".parquet" else r"gaps\.csv:3"
    with pytest.raises(DatasetError, match=rf"{where}: empty {column}: every row needs a user, an item and a timestamp"):
        load_table(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_side_feature_and_profile_values_are_no_token_and_unknown(tmp_path, suffix):
    # 8 users with the same 5 items; odd users and item e have their optional values missing
    # (Parquet None / NaN, CSV empty or blank cells).
    missing = [None, np.nan] if suffix == ".parquet" else ["", "  "]
    rows = [{"user": f"u{u}", "item": item, "timestamp": t,
             "item_genre": missing[t % 2] if item == "e" else f"g{item}",
             "user_gender": missing[u % 4 // 2] if u % 2 else "FM"[u % 4 // 2],
             "user_age": np.nan if u % 2 else 25.0}
            for u in range(8) for t, item in enumerate("abcde")]
    path = tmp_path / f"gaps{suffix}"
    table = pd.DataFrame(rows)
    table.to_parquet(path) if suffix == ".parquet" else table.to_csv(path, index=False)
    data = _load(path, tmp_path)
    # Parquet's float column (an integer column with nulls) gives "25", as events send it; a CSV's text stays as written.
    age = "25" if suffix == ".parquet" else "25.0"
    assert data.profile_vocab.tolist() == ["gender=<unknown>", "gender=F", "gender=M", "age=<unknown>", f"age={age}"]
    odd = np.array([int(u[1:]) % 2 == 1 for u in data.user_ids])
    assert (data.user_profile[odd] == 0).all() and (data.user_profile[~odd] > 0).all()
    assert data.side_vocab.tolist() == ["<pad>", "item_genre=ga", "item_genre=gb", "item_genre=gc", "item_genre=gd"]
    assert (data.item_side[data.item_ids.tolist().index("e")] == 0).all()


@pytest.mark.parametrize("suffix, dtype", [(".csv", object), (".parquet", object), (".parquet", "string"), (".parquet", "category")])
def test_a_row_that_leaves_an_attribute_out_does_not_hide_the_value_of_later_rows(tmp_path, suffix, dtype):
    # Every user's first row lacks the profile, and the first user's rows (every item's first) lack the genre
    # (an empty cell of a pandas `string` or `category` column was taken as the value: the genre and profile lost).
    rows = [{"user": f"u{u}", "item": item, "timestamp": t,
             "item_genre": ("" if dtype != object else None) if u == 0 else f"g{item}",
             "user_gender": ("" if dtype != object else None) if t == 0 else "FM"[u % 2]}
            for u in range(8) for t, item in enumerate("abcde")]
    path = tmp_path / f"later{suffix}"
    table = pd.DataFrame(rows).astype({"item_genre": dtype, "user_gender": dtype})
    table.to_parquet(path) if suffix == ".parquet" else table.to_csv(path, index=False)
    data = _load(path, tmp_path)
    assert data.side_vocab.tolist() == ["<pad>", *(f"item_genre=g{item}" for item in "abcde")]
    assert (data.item_side[:, 0] == np.arange(6)).all()
    assert data.profile_vocab.tolist() == ["gender=<unknown>", "gender=F", "gender=M"]
    assert data.user_profile[:, 0].tolist() == [2 if int(u[1:]) % 2 else 1 for u in data.user_ids]


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="built-in names: ml-1m, beauty"):
        _load(tmp_path / "nothing-here", tmp_path)


def test_a_missing_beauty_file_says_which_setting_points_at_it(tmp_path):
    with pytest.raises(DatasetError, match="shared_data_dir.*MINDSTREAM_PATHS__SHARED_DATA_DIR"):
        load_dataset("beauty", tmp_path / "data", tmp_path / "cache", tmp_path / "no-shared-data")


def _five_users_five_items(**columns) -> pd.DataFrame:
    """8 users x the same 5 items (a 5-core that survives), plus the given per-row columns."""
    rows = [{"user": f"u{u}", "item": item, "timestamp": 1_000 * t + u} for u in range(8) for t, item in enumerate("abcde")]
    table = pd.DataFrame(rows)
    for name, value in columns.items():
        table[name] = [value(r) for r in rows]
    return table


def test_a_profile_value_no_training_user_has_is_unknown(tmp_path):
    """Its row would never be trained: a held-out user (and one served later) would get that row's
    random initial features instead of the unknown value's zeros, and the held-out users' values
    would leak into the training vocabulary."""
    path = tmp_path / "zips.csv"
    _five_users_five_items(user_zip=lambda r: f"z{r['user']}").to_csv(path, index=False)  # one value per user
    data = _load(path, tmp_path)
    held_out = np.concatenate([data.valid_users, data.test_users])
    assert len(held_out) and (data.user_profile[held_out, 0] == 0).all() and (data.user_profile[data.train_users, 0] > 0).all()
    assert data.profile_vocab.tolist() == ["zip=<unknown>", *sorted(f"zip=z{u}" for u in data.user_ids[data.train_users])]
    assert data.profile_cardinalities.tolist() == [len(data.train_users) + 1]


def test_profile_fields_are_named_as_events_name_them(tmp_path):
    path = tmp_path / "profiles.csv"
    _five_users_five_items(user_gender=lambda r: "FM"[int(r["user"][1:]) % 2], User_Age=lambda r: "25").to_csv(path, index=False)
    data = _load(path, tmp_path)
    assert data.profile_fields.tolist() == ["gender", "Age"]  # an event's {"profile": {"gender": "F", "Age": "25"}}
    clash = tmp_path / "clash.csv"
    _five_users_five_items(user_gender=lambda r: "F", USER_gender=lambda r: "M").to_csv(clash, index=False)
    with pytest.raises(DatasetError, match=r"the columns \['USER_gender', 'user_gender'\] appear more than once"):
        load_table(clash)
    unnamed = tmp_path / "unnamed.csv"
    _five_users_five_items(user_=lambda r: "F").to_csv(unnamed, index=False)
    with pytest.raises(DatasetError, match="each `user_<name>` needs a name of its own"):
        load_table(unnamed)


@pytest.mark.parametrize("zone", [None, "Europe/Paris"])
def test_a_parquet_datetime_column_is_read_as_unix_milliseconds(tmp_path, zone):
    path = tmp_path / "dates.parquet"
    times = pd.to_datetime(["2020-01-01 00:00:00.000", "2020-01-01 00:00:01.500"]).tz_localize(zone)
    pd.DataFrame({"user": ["u1", "u1"], "item": ["a", "b"], "timestamp": times}).to_parquet(path)
    offset = 3_600_000 if zone else 0  # Paris is UTC+1 in January; a time without a zone is UTC
    assert load_table(path).frame["ts"].tolist() == [1_577_836_800_000 - offset, 1_577_836_801_500 - offset]


def test_a_stored_parquet_index_is_a_column_when_named_and_no_row_number_otherwise(tmp_path):
    named = tmp_path / "named.parquet"
    pd.DataFrame({"item": ["a", "b"], "timestamp": [1, 2]}, index=pd.Index(["u1", "u2"], name="user")).to_parquet(named)
    assert load_table(named).frame["user"].tolist() == ["u1", "u2"]
    filtered = tmp_path / "filtered.parquet"
    table = pd.DataFrame({"user": ["u1", "u2", "u3"], "item": ["a", "b", "c"], "timestamp": ["1", "2", "x"]}, index=["r1", "r2", "r3"])
    table.iloc[[0, 2]].to_parquet(filtered)  # a string index with a gap: the bad row is the file's second
    with pytest.raises(DatasetError, match=r"filtered\.parquet, row 2: timestamp 'x'"):
        load_table(filtered)


def test_a_parquet_list_column_is_one_token_per_element(tmp_path):
    path = tmp_path / "lists.parquet"
    # item c's first rows carry an empty list: no value, which must not hide the later rows' one
    _five_users_five_items(item_genres=lambda r: ["Action", "Comedy"] if r["item"] == "a" else
                           ([] if r["item"] == "c" and r["user"] < "u4" else ["Drama"])).to_parquet(path)
    raw = load_table(path)
    assert raw.item_side["a"] == ["item_genres=Action", "item_genres=Comedy"] and raw.item_side["b"] == ["item_genres=Drama"]
    assert raw.item_side["c"] == ["item_genres=Drama"]


def test_id_column_spellings_are_no_side_columns_and_repeated_names_are_refused(tmp_path):
    both = tmp_path / "both.parquet"  # user ids saved as the index too, beside the user column and a user_id column
    table = _five_users_five_items(user_id=lambda r: r["user"], item_id=lambda r: r["item"], user_gender=lambda r: "F")
    table.set_index(pd.Index(table["user"], name="user")).to_parquet(both)
    raw = load_table(both)
    assert list(raw.user_profile.columns) == ["gender"] and raw.item_side == {}
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("user,item,timestamp, user\nu1,a,1,u1\n")
    with pytest.raises(DatasetError, match=r"the columns \['user'\] appear more than once"):
        load_table(repeated)


def test_a_file_that_changes_while_it_is_read_is_not_cached(synthetic_csv, tmp_path, monkeypatch):
    import model_export.data as data_module

    read = data_module.load_raw

    def read_then_append(*args):
        raw = read(*args)
        with open(synthetic_csv, "a") as fh:  # another process still writing the file
            fh.write("u0,i1,99999999\n")
        return raw

    monkeypatch.setattr(data_module, "load_raw", read_then_append)
    with pytest.raises(DatasetError, match="changed while being read"):
        _load(synthetic_csv, tmp_path)
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_ids_and_values_are_read_without_surrounding_spaces_or_float_tails(tmp_path):
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("user, item, timestamp, user_gender\nu1, a, 1, F\nu1,a ,2,F\n")
    raw = load_table(spaced)
    assert raw.frame["user"].tolist() == ["u1", "u1"] and raw.frame["item"].tolist() == ["a", "a"]
    assert raw.user_profile.loc["u1", "gender"] == "F"
    floats = tmp_path / "floats.parquet"
    pd.DataFrame({"user": [1.0, 2.0], "item": [7.0, 8.0], "timestamp": [1, 2]}).to_parquet(floats)
    raw = load_table(floats)
    assert raw.frame["user"].tolist() == ["1", "2"] and raw.frame["item"].tolist() == ["7", "8"]  # as events send them
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffu1 a b\n".encode())
    assert load_sequence_file(bom).frame["user"].tolist() == ["u1", "u1"]


def test_a_csv_error_names_the_line_after_a_quoted_field_spanning_lines_and_a_non_utf8_line(tmp_path):
    multiline = tmp_path / "multiline.csv"
    multiline.write_text('user,item,timestamp,item_note\nu1,a,1,"two\nlines"\nu1,b,x,\n')
    with pytest.raises(DatasetError, match=r"multiline\.csv:4: timestamp 'x'"):
        load_table(multiline)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"user,item,timestamp\nu1,a,1\nu1,caf\xe9,2\n")
    with pytest.raises(DatasetError, match=r"latin\.csv:3: not UTF-8 text"):
        load_table(latin)


def test_a_damaged_cache_is_made_again(synthetic_csv, tmp_path):
    data = _load(synthetic_csv, tmp_path)
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(b"")  # a zero-byte copy
    assert _load(synthetic_csv, tmp_path).fingerprint == data.fingerprint
    assert cached.stat().st_size > 0


def test_a_delimiter_ending_every_row_shifts_no_column_and_extra_fields_are_refused_by_line(tmp_path):
    # pandas read the one field more than the header as the rows' index: every column moved one to the left
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("user,item,timestamp\nu1,i1,1,\nu1,i2,2,\n")
    raw = load_table(trailing)
    assert raw.frame["user"].tolist() == ["u1", "u1"] and raw.frame["item"].tolist() == ["i1", "i2"] and raw.frame["ts"].tolist() == [1, 2]
    for name, text, line in [("extra.csv", "user,item,timestamp\nu1,i1,1,5\nu1,i2,2,6\n", 2),  # a value pandas dropped with a warning
                             ("later.csv", "user,item,timestamp\nu1,i1,1,\nu1,i2,2,x\n", 3)]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DatasetError, match=rf"{name}:{line}: 4 fields, but the header names 3 columns"):
            load_table(tmp_path / name)


@pytest.mark.parametrize("row, says", [("u1,i3,3,ok,extra\n", r":7: 5 fields, but the header names 4 columns"),
                                       ('u1,i3,3,"ok\n', r":7: a quoted field runs to the end of the file")])
def test_a_csv_parser_error_names_the_line_not_the_record(tmp_path, row, says):
    """pandas numbers records, the header included: a quoted field spanning lines and a blank line put line 7 at record 5."""
    path = tmp_path / "records.csv"
    path.write_text('user,item,timestamp,item_note\nu1,i1,1,"two\nlines"\n\nu1,i2,2,"and\ntwo"\n' + row)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}{says}[^\n]*$"):
        load_table(path)


@pytest.mark.parametrize("control", ["\x00", "\x01", "\x7f"])
def test_ids_with_a_control_character_are_refused_by_line_or_row(tmp_path, control):
    """numpy's strings drop a trailing NUL and pandas' hashing stops at one: the users "x\\0a" and "x\\0b"
    merged (or failed preprocessing) while the events' contract takes them as two; pandas' CSV reader
    even cuts a value at a NUL, silently."""
    sequences = tmp_path / "ids.txt"
    sequences.write_text(f"u1 a b\nx{control}a c d\n")
    with pytest.raises(DatasetError, match=r"ids\.txt:2: id 'x\\x[0-9a-f]{2}a' holds a control character"):
        load_sequence_file(sequences)
    table = tmp_path / "ids.csv"
    table.write_text(f"user,item,timestamp\nu1,a,1\nu1,b{control},2\n")
    with pytest.raises(DatasetError, match=r"ids\.csv:3: .*(control character|NUL character)"):
        load_table(table)
    parquet = tmp_path / "ids.parquet"
    pd.DataFrame({"user": ["u1", f"x{control}a"], "item": ["a", "b"], "timestamp": [1, 2]}).to_parquet(parquet)
    with pytest.raises(DatasetError, match=r"ids\.parquet, row 2: user 'x\\x[0-9a-f]{2}a' holds a control character"):
        load_table(parquet)


def test_a_profile_column_whose_name_holds_the_token_separator_is_refused(tmp_path):
    # the token "a=b=F" was trained, but serving reads it as the field "a" (split at the first "="): ignored
    path = tmp_path / "profiles.csv"
    _five_users_five_items(**{"user_a=b": lambda r: "F"}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"profiles\.csv: profile column 'user_a=b': a profile field's name cannot hold '='"):
        load_table(path)


def test_a_csv_value_over_the_csv_modules_field_limit_does_not_hide_the_error(tmp_path):
    # pandas reads any size; the csv module that finds the line of an error stopped at 128 KiB with a traceback
    path = tmp_path / "long.csv"
    path.write_text(f"user,item,timestamp,item_note\nu1,a,1,{'n' * 200_000}\n,b,2,x\n")
    with pytest.raises(DatasetError, match=r"long\.csv:3: empty user"):
        load_table(path)


def test_parquet_ids_that_are_no_text_or_whole_int64_are_refused_by_row(tmp_path):
    binary = tmp_path / "binary.parquet"
    pd.DataFrame({"user": [b"u1", b"\xff"], "item": ["a", "b"], "timestamp": [1, 2]}).to_parquet(binary)
    with pytest.raises(DatasetError, match=r"binary\.parquet, row 2: user b'\\xff' is not UTF-8 text"):
        load_table(binary)
    for name, values in [("huge", [3.0, 2e20]), ("fraction", [3.0, 1.5])]:  # 2e20 became -9223372036854775808, as did 3e20
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame({"user": values, "item": ["a", "b"], "timestamp": [1, 2]}).to_parquet(path)
        with pytest.raises(DatasetError, match=rf"{name}\.parquet, row 2: user {re.escape(repr(values[1]))} is not a whole number within int64"):
            load_table(path)


@pytest.mark.parametrize("header, says", [
    ("user,item,timestamp,user", r"\['user'\] appear more than once"),  # pandas read the second as "user.1": dropped
    ("user,item,timestamp,item_genre,item_genre", r"\['item_genre'\] appear more than once"),  # a side feature "item_genre.1"
    ("User,user,item,timestamp", r"\['User', 'user'\] appear more than once"),  # the last one was taken as the user column
])
def test_a_column_named_twice_is_refused_as_the_file_names_it(tmp_path, header, says):
    path = tmp_path / "twice.csv"
    path.write_text(header + "\n" + ",".join(["x"] * (header.count(",") + 1)) + "\n")
    with pytest.raises(DatasetError, match=says):
        load_table(path)


def test_ids_are_kept_as_events_carry_them(tmp_path):
    """An id holds any character an event's id may: only spaces (and tabs between the ids of a line)
    separate, and only spaces around a table's id are stripped."""
    lines = tmp_path / "lines.txt"
    lines.write_text("u1 it\u00a0em b\u2028c\n", encoding="utf-8")
    assert load_sequence_file(lines).frame["item"].tolist() == ["it\u00a0em", "b\u2028c"]
    table = tmp_path / "ends.csv"
    table.write_text("user,item,timestamp\nu1, \u00a0item ,1\nu1,\u00a0,2\n", encoding="utf-8")
    assert load_table(table).frame["item"].tolist() == ["\u00a0item", "\u00a0"]  # an id of U+00A0 alone was refused as empty
    blank_but_nbsp = tmp_path / "nbsp-row.csv"  # and a row of it dropped as blank, not refused for its empty item
    blank_but_nbsp.write_text("user,item,timestamp\nu1,i1,1\n\u00a0,,\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"nbsp-row\.csv:3: empty item"):
        load_table(blank_but_nbsp)


@pytest.mark.parametrize("name, content, says", [
    ("cr.txt", b"u1 a b\ru2 c d\r", r"cr\.txt:1: a carriage return inside a line"),  # one user to split(), u2 an item
    ("us.txt", b"u1 it\x1fem b\n", r"us\.txt:1: id 'it\\x1fem' holds a control character"),  # split() cut the id there
    ("long.txt", f"u1 {'x' * 257} b\n".encode(), r"long\.txt:1: id 'x+'\.\.\. has 257 characters"),  # no event could name it
    ("ends.csv", b"user,item,timestamp\nu1,item\x1f,2\n", r"ends\.csv:2: item 'item\\x1f' holds a control character"),  # stripped before
])
def test_an_id_no_event_could_carry_is_refused_with_its_line(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=says):
        (load_table if name.endswith(".csv") else load_sequence_file)(path)


def test_a_profile_no_event_could_carry_is_refused(tmp_path):
    """Every replayed event of a user whose profile value is over 256 characters, or of any user of a
    file with over 16 profile columns, was refused by the events contract after training on them."""
    long = tmp_path / "long.csv"
    long.write_text("user,item,timestamp,user_bio\nu1,a,1,short\nu2,a,2,\nu2,b,3," + "x" * 257 + "\n")
    with pytest.raises(DatasetError, match=r"long\.csv:4: user_bio 'x+'\.\.\. has 257 characters; a profile value has at most 256"):
        load_table(long)
    many = tmp_path / "many.csv"
    many.write_text("user,item,timestamp," + ",".join(f"user_f{n}" for n in range(17)) + "\nu1,a,1" + ",v" * 17 + "\n")
    with pytest.raises(DatasetError, match="17 profile columns .*at most 16 fields"):
        load_table(many)
    long_name = tmp_path / "long-name.csv"
    long_name.write_text(f"user,item,timestamp,user_{'n' * 257}\nu1,a,1,v\n")
    with pytest.raises(DatasetError, match="a field name has at most 256 characters"):
        load_table(long_name)


def test_a_blank_first_line_is_named_as_the_missing_header(tmp_path):
    path = tmp_path / "blank-first.csv"
    path.write_text("\nuser,item,timestamp\nu1,a,1\n")  # pandas took the blank line as a header of no columns
    with pytest.raises(DatasetError, match=r"blank-first\.csv:1: the first line is blank, and the first line is the header"):
        load_table(path)


def test_an_item_called_pad_is_an_item_like_any_other(tmp_path):
    path = tmp_path / "pad.txt"
    path.write_text("".join(f"u{u} <pad> a b c d\n" for u in range(12)))
    data = preprocess(load_sequence_file(path), "pad", split_seed=1)
    assert data.item_ids.tolist() == ["<pad>", "<pad>", "a", "b", "c", "d"]
    assert data.seq_items.min() == 1  # the item "<pad>" is index 1, never the padding index 0
