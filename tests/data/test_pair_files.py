"""Preference-pair files: text and chat pairs, round trips, every error naming file:line, the held-out split."""

import json

import pytest

from llmrl.data.pairs import PreferencePair, load_pairs, save_pairs, split_heldout


# ----------------------------------------------------------------------------- pair files

CHAT = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]}


def write(tmp_path, *lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_load_text_and_chat_pairs_and_round_trip(tmp_path):
    pairs = load_pairs(write(tmp_path, {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "hand"}, "", CHAT))
    assert pairs[0] == PreferencePair("2+2?", "4", "5", {"source": "hand"})
    assert pairs[1].prompt == CHAT["prompt"] and pairs[1].chosen == CHAT["chosen"] and pairs[1].meta == {}
    assert load_pairs(save_pairs(pairs, tmp_path / "out" / "again.jsonl")) == pairs


@pytest.mark.parametrize("lines,message", [
    ([], "is empty"),
    (["   "], "is empty"),
    (["{not json"], r"pairs.jsonl:1: not valid JSON"),
    (["[1, 2]"], r"pairs.jsonl:1: each line must be a JSON object"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     r"pairs.jsonl:2: missing key 'rejected'"),
    ([{"prompt": 3, "chosen": "b", "rejected": "c"}], r":1: 'prompt' must be a string or a non-empty list"),
    ([{"prompt": [], "chosen": "b", "rejected": "c"}], r"'prompt' must be a string or a non-empty list"),
    ([{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}], r"prompt\[0\] must be a message"),
    ([{**CHAT, "chosen": [{"role": "user", "content": "x"}]}], r"'chosen' as messages must be exactly one assistant"),
    ([{**CHAT, "rejected": CHAT["rejected"] * 2}], r"'rejected' as messages must be exactly one assistant"),
])
def test_load_pairs_errors(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path, *lines))


def test_load_pairs_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")


def test_split_heldout_by_prompt():
    pairs = [PreferencePair(f"q{i % 10}", f"a{i}", f"b{i}") for i in range(40)]
    train, held = split_heldout(pairs, 0.2, seed=3)
    assert len({p.prompt for p in held}) == 2 and not {p.prompt for p in held} & {p.prompt for p in train}
    assert len(train) + len(held) == 40 and split_heldout(pairs, 0.2, seed=3) == (train, held)
    assert split_heldout(pairs, 0.0, seed=3) == (pairs, [])
