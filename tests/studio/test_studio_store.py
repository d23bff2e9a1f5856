"""The append-only label store: one line per key across threads and processes, torn lines survived."""

import json
import multiprocessing as mp
import threading

from llmrl.studio.store import LabelStore


def _writer(path, keys, who, out):
    store = LabelStore(path)
    out.put(sum(store.append({"x": k}, key=k, labeller=who) for k in keys))


def test_processes_racing_on_the_same_keys_write_each_key_once(tmp_path):
    path = tmp_path / "labels.jsonl"
    keys = [f"k{i}" for i in range(40)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, keys[::d], f"p{d}", out)) for d in (1, 1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    written = sum(out.get(timeout=5) for _ in procs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == len(rows) == len(keys) and sorted(r["key"] for r in rows) == sorted(keys)
    assert all(r["labeller"].startswith("p") and r["time"].endswith("+00:00") for r in rows)


def test_threads_of_one_server_write_each_key_once(tmp_path):
    store = LabelStore(tmp_path / "labels.jsonl")
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.append({}, key="same", labeller="t")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True] and len(store.rows()) == 1


def test_a_torn_last_line_is_skipped_and_the_next_label_starts_on_its_own_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    store = LabelStore(path)
    assert store.append({"a": 1}, key="one", labeller="x")
    with open(path, "ab") as fh:
        fh.write(b'{"a": 2, "key": "tw')                     # a kill in the middle of a write
    again = LabelStore(path)                                   # a restarted server
    assert again.keys() == {"one"}
    assert again.append({"a": 3}, key="three", labeller="x")
    lines = path.read_text().splitlines()
    assert lines[1] == '{"a": 2, "key": "tw' and json.loads(lines[2])["key"] == "three"
    assert [r["key"] for r in again.rows()] == ["one", "three"]


def test_exclusive_stores_share_one_lock_and_refuse_a_key_labelled_in_the_other(tmp_path):
    pairs = LabelStore(tmp_path / "pairs.jsonl")
    ties = LabelStore(tmp_path / "ties.jsonl", share_lock_with=pairs)
    assert ties.append({}, key="k", labeller="x", exclusive_with=(pairs,))
    assert not pairs.append({}, key="k", labeller="x", exclusive_with=(ties,))
    assert pairs.rows() == []
    lone = LabelStore(tmp_path / "other.jsonl")
    try:
        pairs.append({}, key="z", labeller="x", exclusive_with=(lone,))
    except ValueError as e:
        assert "share" in str(e)
    else:
        raise AssertionError("a store with its own lock cannot be exclusive")
