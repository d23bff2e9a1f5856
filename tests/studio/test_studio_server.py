"""`llmrl studio` as a real server process: it binds 127.0.0.1, prints a tokened URL, and a SIGKILL mid-session
loses no acknowledged label, writes none twice, and the next server resumes at the first unlabelled item."""

import json
import re
import threading

from llmrl.data.pairs import load_pairs
from run_folders import write_run
from studio_proc import Server


def test_killed_server_loses_nothing_and_the_session_resumes(tmp_path):
    run = write_run(tmp_path / "run", hacked=False)
    labels = tmp_path / "labels"
    server = Server(str(run), "--labels", str(labels), "--labeller", "ann")
    try:
        assert server.host == "127.0.0.1" and len(server.token) >= 24
        assert server.request("GET", "/pairs", params={"token": "wrong"})[0] == 403
        status, _, html = server.request("GET", "/pairs")
        total = int(re.search(r"0 of (\d+) labelled", html).group(1))
        acked, stop = [], threading.Event()

        def label_until_killed():              # one tab labelling as fast as it can
            while not stop.is_set():
                try:
                    _, _, page = server.request("GET", "/pairs")
                    key = re.search(r'data-key="([^"]+)"', page).group(1)
                    status, headers, _ = server.request("POST", "/pairs", form={"key": key, "choice": "a"})
                except (OSError, AttributeError):    # the server died under us
                    return
                if status == 303 and headers["Location"].endswith("msg=saved"):
                    acked.append(key)

        worker = threading.Thread(target=label_until_killed)
        worker.start()
        while len(acked) < 5 and worker.is_alive():
            threading.Event().wait(0.05)
        server.kill()                               # mid-session: the worker may be in the middle of a request
        stop.set()
        worker.join(30)
    finally:
        server.kill()
    assert len(acked) >= 5
    rows = [json.loads(line) for line in (labels / "pairs.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert set(acked) <= set(keys) and len(keys) == len(set(keys))      # nothing acknowledged lost, nothing twice
    assert all(r["labeller"] == "ann" for r in rows)
    assert len(load_pairs(labels / "pairs.jsonl")) == len(rows)           # the file `llmrl dpo` / `rm` read is whole

    again = Server(str(run), "--labels", str(labels))
    try:
        _, _, html = again.request("GET", "/pairs")
        assert f"{len(rows)} of {total} labelled" in html
        next_key = re.search(r'data-key="([^"]+)"', html).group(1)
        assert next_key not in keys
        status, headers, _ = again.request("POST", "/pairs", form={"key": keys[0], "choice": "b"})   # a stale tab
        assert status == 303 and headers["Location"].endswith("msg=duplicate")
        status, headers, _ = again.request("POST", "/pairs", form={"key": next_key, "choice": "tie"})
        assert headers["Location"].endswith("msg=saved")
    finally:
        again.kill()
    assert len((labels / "pairs.jsonl").read_text().splitlines()) == len(rows)
    assert [json.loads(x)["key"] for x in (labels / "ties.jsonl").read_text().splitlines()] == [next_key]
