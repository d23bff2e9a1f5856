"""The studio app through Flask's test client: access token, body limit, escaping of hostile model text, the rollout
filters, preference and step labels (format, no duplicates across tabs, resume after a restart)."""

import json
import re
from pathlib import Path

import pytest

from llmrl.data.pairs import load_pairs
from llmrl.data.step_labels import load_step_labels
from llmrl.studio.app import MAX_BODY, Settings, visible
from llmrl.studio.server import create_app
from llmrl.studio.data import SampleFilter, filter_samples, load_run_folder, pair_items, split_steps, step_items
from run_folders import write_run

TOKEN = "test-token-123"


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "hacked", hacked=True)


def make_client(run_dir: Path, labels: Path, **kw):
    app = create_app(Settings(runs=[run_dir], labels_dir=labels, labeller="tester", token=TOKEN, **kw))
    return app.test_client(), app.extensions["llmrl_studio"]


@pytest.fixture
def client(run_dir, tmp_path):
    return make_client(run_dir, tmp_path / "labels")


def get(c, path: str, **params):
    return c.get(path, query_string={"token": TOKEN, **params})


def test_every_request_needs_the_token(client):
    app, studio = client[0].application, client[1]
    c = app.test_client(use_cookies=False)
    for path in ("/", "/run/0", "/pairs", "/steps", "/audit", "/run/0/heldout"):
        assert c.get(path).status_code == 403
        assert c.get(path, query_string={"token": "wrong"}).status_code == 403
        assert get(c, path).status_code == 200
    c2, item = app.test_client(use_cookies=False), studio.pairs[0]
    assert c2.post("/pairs", data={"key": item.key, "choice": "a"}).status_code == 403      # no token in the form
    assert studio.pair_store.rows() == []


def test_the_token_cookie_lets_later_pages_in_but_a_post_needs_the_form_field(client):
    c, studio = client
    assert get(c, "/").status_code == 200                  # sets the cookie
    assert c.get("/pairs").status_code == 200
    assert c.post("/pairs", data={"key": studio.pairs[0].key, "choice": "a"}).status_code == 403


def test_request_bodies_are_bounded(client):
    c, studio = client
    big = {"token": TOKEN, "key": studio.pairs[0].key, "choice": "a", "pad": "x" * (MAX_BODY + 10)}
    assert c.post("/pairs", data=big).status_code == 413
    assert studio.pair_store.rows() == []


def test_hostile_text_is_escaped_and_control_characters_shown(client):
    c, _ = client
    for path, params in (("/run/0", {"step": 1}), ("/pairs", {}), ("/steps", {})):
        html = get(c, path, **params).get_data(as_text=True)
        assert "<script>alert" not in html and "<b>bold?</b>" not in html
        assert "\x1b" not in html
    html = get(c, "/run/0", step=1).get_data(as_text=True)
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and "\\x1b[" in html
    assert "\\x1b[31mred\\x1b[0m" in get(c, "/steps").get_data(as_text=True)
    assert visible("a\x1b[31mb\x00c\r\nd\te") == "a\\x1b[31mb\\x00c\\x0d\nd\te"


def test_rollout_filters(run_dir):
    run = load_run_folder(run_dir)
    everything = filter_samples(run.samples, SampleFilter())
    assert sum(map(len, everything.values())) == len(run.samples)
    assert list(everything)[0][0] == 40                                   # latest step first
    only = filter_samples(run.samples, SampleFilter(step=5, truncated=False, min_reward=0.5))
    rows = [s for g in only.values() for s in g]
    assert rows and all(s["step"] == 5 and s["truncated"] is False and s["reward"] >= 0.5 for s in rows)
    long = filter_samples(run.samples, SampleFilter(min_length=30, component="length_bonus", min_component=0.9))
    rows = [s for g in long.values() for s in g]
    assert rows and all(len(s["tokens"]) >= 30 and s["reward_components"]["length_bonus"] >= 0.9 for s in rows)
    assert not filter_samples(run.samples, SampleFilter(component="nope", min_component=0))


def test_rollout_page_shows_groups_side_by_side_and_rejects_bad_filters(client):
    c, _ = client
    html = get(c, "/run/0", step=40).get_data(as_text=True)
    assert html.count('class="group"') == 2 and html.count('class="card"') == 16
    assert 'class="tok"' in html and "A=" in html                         # the report's heatmap
    assert get(c, "/run/0", min_reward="abc").status_code == 400
    assert get(c, "/run/7").status_code == 404


def test_heldout_answers_per_evaluation(client):
    c, _ = client
    html = get(c, "/run/0/heldout").get_data(as_text=True)
    assert all(f"step {s}" in html for s in (0, 10, 20, 30, 40)) and "What is 0 + 40?" in html
    assert "&lt;i&gt;pad&lt;/i&gt;" in html and "<i>pad</i>" not in html


def test_audit_page_lists_the_findings(client):
    c, _ = client
    html = get(c, "/audit").get_data(as_text=True)
    for name in ("reward_vs_heldout", "length_drift", "component_dominance", "duplicate_completions"):
        assert f"<td>{name}</td>" in html


def label_pair(c, key: str, choice: str):
    return c.post("/pairs", data={"token": TOKEN, "key": key, "choice": choice})


def test_pair_labels_are_the_pairs_jsonl_dpo_reads(client, tmp_path):
    c, studio = client
    a, b, t = studio.pairs[:3]
    assert label_pair(c, a.key, "a").status_code == 303
    assert label_pair(c, b.key, "b").status_code == 303
    assert label_pair(c, t.key, "tie").status_code == 303
    pairs = load_pairs(studio.pair_store.path)
    assert [(p.chosen, p.rejected) for p in pairs] == [(a.a, a.b), (b.b, b.a)]
    assert {p.meta["labeller"] for p in pairs} == {"tester"} and all(p.meta["time"] for p in pairs)
    ties = [json.loads(x) for x in studio.tie_store.path.read_text().splitlines()]
    assert [x["key"] for x in ties] == [t.key] and ties[0]["tie"] is True
    assert label_pair(c, a.key, "x").status_code == 400
    assert label_pair(c, "pair:nope", "a").status_code == 400


def test_two_tabs_never_write_an_item_twice(client):
    c, studio = client
    first = get(c, "/pairs").get_data(as_text=True)
    second = get(c, "/pairs").get_data(as_text=True)                 # the second tab shows the same item
    key = re.search(r'data-key="([^"]+)"', first).group(1)
    assert key == re.search(r'data-key="([^"]+)"', second).group(1)
    label_pair(c, key, "a")
    resp = label_pair(c, key, "tie")                                  # the stale tab labels it again
    assert "msg=duplicate" in resp.headers["Location"]
    assert get(c, "/pairs", msg="duplicate").get_data(as_text=True).count("already labelled") == 1
    assert len(studio.pair_store.rows()) == 1 and studio.tie_store.rows() == []


def test_a_restarted_studio_resumes_at_the_first_unlabelled_item(run_dir, tmp_path):
    c, studio = make_client(run_dir, tmp_path / "labels")
    for item in studio.pairs[:2]:
        label_pair(c, item.key, "a")
    c2, studio2 = make_client(run_dir, tmp_path / "labels")          # a new server on the same label folder
    html = get(c2, "/pairs").get_data(as_text=True)
    assert f'data-key="{studio2.pairs[2].key}"' in html and f"2 of {len(studio2.pairs)} labelled" in html
    skipped = get(c2, "/pairs", after=studio2.pairs[2].key).get_data(as_text=True)
    assert f'data-key="{studio2.pairs[3].key}"' in skipped


def test_step_labels_are_the_jsonl_prm_reads(client):
    c, studio = client
    assert len(studio.steps[0].steps) == 4            # the hostile sample: its blob, then three steps
    item = studio.steps[1]
    assert len(item.steps) == 3                       # "...ones.\n\n", "The tens give ...\n\n", "Answer: ..."
    marks = ["good", "neutral", "bad"]
    data = {"token": TOKEN, "key": item.key, **{f"step_{i}": m for i, m in enumerate(marks)}}
    assert c.post("/steps", data={**data, "step_2": ""}).status_code == 400       # every step needs a mark
    assert c.post("/steps", data=data).status_code == 303
    assert c.post("/steps", data=data).headers["Location"].endswith("msg=duplicate")
    rows = load_step_labels(studio.step_store.path)
    assert len(rows) == 1 and rows[0]["labels"] == [1.0, 0.5, 0.0] and rows[0]["steps"] == item.steps
    assert rows[0]["labeller"] == "tester" and rows[0]["prompt"] == item.prompt


def test_labeller_name_is_set_by_the_page_and_validated(client):
    c, studio = client
    assert c.post("/labeller", data={"token": TOKEN, "labeller": "ann"}).status_code == 303
    label_pair(c, studio.pairs[0].key, "b")
    assert studio.pair_store.rows()[0]["labeller"] == "ann"
    assert c.post("/labeller", data={"token": TOKEN, "labeller": "x" * 65}).status_code == 400


def test_items_and_step_split(run_dir, tmp_path):
    run = load_run_folder(run_dir)
    pairs = pair_items([run], [])
    assert len({p.key for p in pairs}) == len(pairs) and all(p.a != p.b for p in pairs)
    again = pair_items([run, run], [])                               # the same texts twice: one item each
    assert [p.key for p in again] == [p.key for p in pairs]
    tokens = ["Fir", "st.\n", "\nSe", "cond", "<tool>", ".\n\nThird"]
    steps = split_steps(tokens, [1, 1, 1, 1, 0, 1], "blank_line")
    assert steps == ["First.\n", "\nSecond<tool>", ".\n\nThird"]    # a step starts at the token holding its first
    #                                                                  character; a tool output stays with its step
    items = step_items([run], [])
    assert all("".join(i.steps) for i in items) and len({i.key for i in items}) == len(items)
    from llmrl.data.pairs import PreferencePair, save_pairs

    f = save_pairs([PreferencePair("Q?", "good\n\nanswer", "bad")], tmp_path / "cands.jsonl")
    file_items = pair_items([], [f])
    assert len(file_items) == 1 and {file_items[0].a, file_items[0].b} == {"good\n\nanswer", "bad"}
    assert sorted(i.steps for i in step_items([], [f])) == [["bad"], ["good\n\n", "answer"]]


def test_cli_refuses_bad_inputs_before_serving(tmp_path, capsys):
    from llmrl.cli import main

    assert main(["studio", str(tmp_path / "missing"), "--labels", str(tmp_path / "l")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["studio", "--steps", "sentences", "--labels", str(tmp_path / "l")]) == 2
    assert "valid: blank_line" in capsys.readouterr().err


def test_a_run_still_training_shows_its_new_steps(run_dir, client):
    c, studio = client
    before = [p.key for p in studio.pairs]
    assert "step 45" not in get(c, "/run/0").get_data(as_text=True)
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if '"step": 5,' in x]
    with open(run_dir / "samples.jsonl", "a") as fh:          # the trainer logs step 45
        fh.writelines(json.dumps({**r, "step": 45, "completion": r["completion"] + " again"}) + "\n" for r in rows)
    assert "step 45 · group 0" in get(c, "/run/0").get_data(as_text=True)
    after = [p.key for p in studio.pairs]
    assert len(after) > len(before) and after[:len(before)] == before     # new items queue after the old ones
