"""Shared by the DPO and reward-model tests: a small preference file (plain and chat pairs) and the config that
trains on it with the tiny model."""

import pytest

from llmrl.config_loader import load_config
from llmrl.config_supervised import PreferenceTrainConfig
from llmrl.data.pairs import PreferencePair, save_pairs

PAIRS = [PreferencePair(f"What is {i} + {i}?", str(2 * i), str(2 * i + 1)) for i in range(6)]
PAIRS.append(PreferencePair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}],
                            [{"role": "assistant", "content": "bye"}]))


@pytest.fixture
def pairs_file(tmp_path):
    return str(save_pairs(PAIRS, tmp_path / "pairs.jsonl"))


def config(tmp_path, pairs_file, *overrides):
    return load_config(None, schema=PreferenceTrainConfig, overrides=[
        "model.name=tiny", "model.autocast=none", f"preference.data_path={pairs_file}", "preference.batch_size=3",
        "preference.heldout_fraction=0.3", "optim.micro_batch_size=2", "optim.lr=1e-2", "run.progress=false",
        f"run.output_dir={tmp_path}", "run.name=r", *overrides])
