from __future__ import annotations

import dataclasses

import pytest
import yaml

from llmrl.config import (SECTIONS, ConfigError, RewardTerm, RolloutConfig, TrainConfig, config_to_dict, describe,
                          sections, validate_names)
from llmrl.config_loader import load_config, save_config
from llmrl.config_supervised import (LoraConfig, PreferenceConfig, PreferenceTrainConfig, PrmConfig, PrmTrainConfig,
                                     SftTrainConfig)


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.preset is None
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.autocast == "auto"
    assert cfg.rollout.group_size == 8 and cfg.rollout.prompts_per_step == 4
    assert cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.reward.terms == [RewardTerm("correct", 1.0)]
    assert cfg.objective.aggregation == "token-mean" and cfg.run.eval_max_new_tokens is None
    # mutable defaults are not shared between instances
    cfg.task.options["x"] = 1
    assert load_config(None).task.options == {}


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, {"rollout": {"group_size": 4, "max_new_tokens": 16}, "optim": {"lr": 1e-4}})
    cfg = load_config(path, ["rollout.group_size=2", "optim.lr=3e-6", "optim.betas=[0.8, 0.9]"])
    assert cfg.rollout.group_size == 2                 # override beats file
    assert cfg.rollout.max_new_tokens == 16            # file beats default
    assert cfg.rollout.temperature == 1.0              # untouched default
    assert cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)  # YAML reads 3e-6 as a string
    assert cfg.optim.betas == (0.8, 0.9)               # list -> tuple


def test_preset_precedence(tmp_path):
    presets = {"small": {"rollout": {"group_size": 3, "max_new_tokens": 7, "temperature": 0.5},
                         "optim": {"lr": 1e-3}, "task": {"options": {"digits": 1}}}}
    path = write(tmp_path, {"preset": "small", "rollout": {"max_new_tokens": 9}})
    cfg = load_config(path, ["rollout.temperature=0.7"], presets=presets)
    assert cfg.preset == "small"
    assert cfg.rollout.group_size == 3                 # preset beats default
    assert cfg.rollout.max_new_tokens == 9             # file beats preset
    assert cfg.rollout.temperature == 0.7              # override beats preset
    assert cfg.optim.lr == 1e-3 and cfg.task.options == {"digits": 1}
    assert presets["small"]["task"]["options"] == {"digits": 1}  # not mutated

    cfg = load_config(None, ["preset=small", "task.options.ops=[+]"], presets=presets)
    assert cfg.preset == "small" and cfg.rollout.group_size == 3
    assert cfg.task.options == {"digits": 1, "ops": ["+"]}


def test_shipped_presets_load():
    presets = pytest.importorskip("llmrl.presets").PRESETS
    for name, preset in presets.items():
        cfg = load_config(None, [f"preset={name}"], presets=presets)
        assert cfg.preset == name and cfg.credit.estimator == preset["credit"]["estimator"]


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"preset 'smal' is not one of: big, small \(did you mean 'small'\?\)"):
        load_config(None, ["preset=smal"], presets={"small": {}, "big": {}})
    with pytest.raises(ConfigError, match="preset 'small'"):
        load_config(None, ["preset=small"])            # no presets supplied


def test_dotted_override_into_options(tmp_path):
    path = write(tmp_path, {"task": {"options": {"digits": 2, "ops": ["+"]}}})
    cfg = load_config(path, ["task.options.digits=3", "credit.options.normalize_std=false"])
    assert cfg.task.options == {"digits": 3, "ops": ["+"]}
    assert cfg.credit.options == {"normalize_std": False}
    assert load_config(None, ["task.options.a.b=1"]).task.options == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="'model.name' is not a mapping"):
        load_config(None, ["model.name.x=1"])


def test_file_section_replaces_whole_values(tmp_path):
    presets = {"p": {"credit": {"estimator": "grpo", "options": {"normalize_std": False}}}}
    path = write(tmp_path, {"preset": "p", "credit": {"options": {}}})
    assert load_config(path, presets=presets).credit == load_config(None).credit


def test_list_override_for_reward_terms():
    cfg = load_config(None, ["reward.terms=[{name: correct, weight: 1.0}, {name: format, weight: 0.5, options: {strict: true}}]"])
    assert cfg.reward.terms == [RewardTerm("correct", 1.0), RewardTerm("format", 0.5, {"strict": True})]
    assert load_config(None, ["reward.terms=[correct, format]"]).reward.terms == [RewardTerm("correct"), RewardTerm("format")]
    with pytest.raises(ConfigError, match=r"reward.terms\[0\].name is required"):
        load_config(None, ["reward.terms=[{weight: 2}]"])
    with pytest.raises(ConfigError, match=r"unknown key 'reward.terms\[1\].wieght'.*did you mean 'weight'"):
        load_config(None, ["reward.terms=[a, {name: b, wieght: 2}]"])


def test_typo_names_key_lists_valid_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.group_sise=3"])
    msg = str(err.value)
    assert "unknown key 'rollout.group_sise'" in msg and "valid keys in 'rollout'" in msg
    for name in (fd.name for fd in dataclasses.fields(RolloutConfig)):
        assert name in msg
    assert "did you mean 'group_size'?" in msg

    with pytest.raises(ConfigError, match=r"unknown key 'rolout'; valid top-level keys: .*rollout.*did you mean 'rollout'"):
        load_config(write(tmp_path, {"rolout": {"group_size": 3}}))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.zzz=1"])
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("rollout.group_size=eight", "rollout.group_size must be an int, got 'eight'"),
    ("rollout.group_size=true", "rollout.group_size must be an int, got True"),   # bool is not an int
    ("rollout.group_size=2.5", "rollout.group_size must be an int, got 2.5"),
    ("rollout.temperature=hot", "rollout.temperature must be a number, got 'hot'"),
    ("rollout.temperature=", "rollout.temperature must be a number, got None"),   # None only where allowed
    ("model.chat_template=1", "model.chat_template must be a bool (true/false), got 1"),
    ("model.name=[a]", "model.name must be a string, got ['a']"),
    ("run.threads=many", "run.threads must be an int or null, got 'many'"),
    ("task.options=[1]", "task.options must be a mapping, got [1]"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 values, got [0.9]"),
    ("optim.betas=[0.9, x]", "optim.betas[1] must be a number, got 'x'"),
    ("reward.terms=correct", "reward.terms must be a list, got 'correct'"),
    ("rollout=3", "rollout must be a mapping of keys, got 3"),
])
def test_type_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_types_accepted():
    cfg = load_config(None, ["rollout.temperature=1", "run.threads=2", "run.threads=", "model.system_prompt=Be brief."])
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.run.threads is None and cfg.model.system_prompt == "Be brief."


@pytest.mark.parametrize("override", [
    "rollout.group_size=0", "rollout.prompts_per_step=0", "rollout.max_new_tokens=0", "rollout.temperature=-0.1",
    "rollout.top_p=0", "rollout.top_p=1.01", "optim.lr=0", "optim.lr=-1e-5", "run.steps=-1",
    "optim.micro_batch_size=0", "objective.clip_low=1.01", "objective.clip_low=-0.1", "objective.clip_high=-0.1",
    "task.heldout_size=0", "objective.epochs=0", "objective.minibatches=0",
])
def test_range_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be [<>]=? "):
        load_config(None, [override])


def test_range_boundaries_accepted():
    cfg = load_config(None, ["rollout.top_p=1", "rollout.temperature=0", "objective.clip_low=0", "run.steps=0",
                             "rollout.group_size=1", "objective.clip_high=10"])
    assert load_config(None, ["objective.clip_low=1"]).objective.clip_low == 1.0  # 1 = no lower clip
    assert cfg.rollout.top_p == 1.0 and cfg.objective.clip_low == 0.0 and cfg.run.steps == 0


@pytest.mark.parametrize("override, suggestion", [
    ("objective.aggregation=token_mean", "token-mean"), ("model.dtype=bf16", "bfloat16"), ("model.autocast=bfloat", "bfloat16"),
    ("rollout.engine=vlm", "vllm"), ("objective.kl_estimator=k4", None), ("optim.schedule=cosin", "cosine"),
])
def test_choice_errors(override, suggestion):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"{key} '{value}' is not one of: ")
    assert (f"did you mean '{suggestion}'?" in msg) if suggestion else ("did you mean" not in msg)


def test_validate_names():
    names = dict(rewards=["correct", "format"], credit=["grpo", "broadcast"], objectives=["ppo_clip"])
    validate_names(load_config(None), **names)
    with pytest.raises(ConfigError) as err:
        validate_names(load_config(None, ["credit.estimator=gpro"]), **names)
    assert str(err.value) == "credit.estimator 'gpro' is not one of: broadcast, grpo (did you mean 'grpo'?)"
    with pytest.raises(ConfigError, match=r"^reward.terms\[1\].name 'formt' is not one of: correct, format"):
        validate_names(load_config(None, ["reward.terms=[correct, formt]"]), **names)
    with pytest.raises(ConfigError, match="^objective.name 'grpo' is not one of: ppo_clip"):
        validate_names(load_config(None, ["objective.name=grpo"]), **names)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="task.train_path is required"):
        load_config(None, ["task.name=jsonl"])
    assert load_config(None, ["task.name=jsonl", "task.train_path=a.jsonl"]).task.train_path == "a.jsonl"
    with pytest.raises(ConfigError, match="reward.terms must list at least one"):
        load_config(None, ["reward.terms=[]"])
    with pytest.raises(ConfigError, match=r"reward.terms\[0\].weight must be finite"):
        load_config(None, ["reward.terms=[{name: a, weight: .inf}]"])
    with pytest.raises(ConfigError, match=r"reward.terms\[0\].weight must be a number, got nan"):
        load_config(None, ["reward.terms=[{name: a, weight: .nan}]"])


def test_bad_files_and_overrides(tmp_path):
    bad = write(tmp_path, "rollout: {group_size: [", "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    listy = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml.*must hold a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(write(tmp_path, "", "empty.yaml")) == TrainConfig()
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["rollout.group_size"])


def test_round_trip(tmp_path):
    presets = {"p": {"rollout": {"group_size": 3}}}
    cfg = load_config(None, ["preset=p", "optim.betas=[0.5, 0.75]", "task.options.ops=[+, '-']", "optim.lr=2e-6",
                             "reward.terms=[correct, {name: format, weight: 0.25, options: {strict: true}}]",
                             "model.system_prompt=Think.", "run.threads=2"], presets=presets)
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    plain = yaml.safe_load(path.read_text())
    assert plain == config_to_dict(cfg) and plain["optim"]["betas"] == [0.5, 0.75]
    assert load_config(path) == cfg                   # complete file: the preset table is not needed
    assert load_config(path, presets=presets) == cfg
    assert load_config(path).rollout.group_size == 3


def test_describe_covers_every_field():
    for cls in [TrainConfig, RewardTerm, *SECTIONS.values()]:
        rows = describe(cls)
        assert [r[0] for r in rows] == [fd.name for fd in dataclasses.fields(cls)]
        assert all(isinstance(help, str) and help.strip() for _, _, help in rows), cls
    rows = {name: (default, help) for name, default, help in describe(RolloutConfig)}
    assert rows["group_size"] == ("8", "G: samples per prompt")
    assert dict((n, d) for n, d, _ in describe(RewardTerm))["name"] == "required"


def test_extends_layers_a_base_file_under_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout: {group_size: 4, max_new_tokens: 7}\nrun: {steps: 3, name: base}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrollout: {group_size: 6}\n")
    cfg = load_config(tmp_path / "child.yaml", ["run.name=over"])
    assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.run.steps, cfg.run.name) == (6, 7, 3, "over")


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "c.yaml")


def test_every_example_config_loads():
    from pathlib import Path

    from llmrl.presets import PRESETS

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*_arithmetic.yaml"))
    assert len(examples) >= 9
    schemas = {"dpo": PreferenceTrainConfig, "rm": PreferenceTrainConfig, "prm": PrmTrainConfig,
               "sft": SftTrainConfig, "rft": SftTrainConfig}
    for path in examples:
        schema = schemas.get(path.name.partition("_")[0], TrainConfig)   # one loader, each command's schema
        assert isinstance(load_config(path, presets=PRESETS if schema is TrainConfig else None, schema=schema), schema)


# ----------------------------------------------------------------------------- one loader for every command

def test_the_supervised_schemas_take_extends_overrides_and_null_sections(tmp_path):
    write(tmp_path, "model: {name: tiny}\ntask: {name: arithmetic, options: {digits: 3}}\nrun: {threads: 1}\n",
          "base.yaml")
    path = write(tmp_path, "extends: base.yaml\npreference: {beta: 0.3}\nlora: null\n", "dpo.yaml")
    cfg = load_config(path, ["preference.kind=ipo", "task.options.ops=['+']"], schema=PreferenceTrainConfig)
    assert cfg.model.name == "tiny" and cfg.run.threads == 1 and cfg.preference.beta == 0.3
    assert cfg.preference.kind == "ipo" and cfg.task.options == {"digits": 3, "ops": ["+"]} and cfg.lora is None
    assert cfg.run.name == "dpo" and cfg.optim.lr == 5e-6        # the schema's own defaults for its sections
    assert load_config(path, ["lora.r=4"], schema=PreferenceTrainConfig).lora == LoraConfig(r=4)   # back, defaults
    cleared = load_config(path, ["task=null", "preference.data_path=p.jsonl"], schema=PreferenceTrainConfig)
    assert cleared.task is None
    prm = load_config(path.parent / "base.yaml", ["prm.data_path=x", "lora.r=2"], schema=PrmTrainConfig)
    assert prm.prm.data_path == "x" and prm.lora.r == 2 and prm.run.name == "prm" and prm.optim.micro_batch_size == 8


@pytest.mark.parametrize("schema,overrides,message", [
    (PreferenceTrainConfig, ["preset=grpo"], r"unknown key 'preset'; valid top-level keys: lora, model, optim, "),
    (PreferenceTrainConfig, ["preference.beta=x", "preference.data_path=p"], r"preference.beta must be a number"),
    (PreferenceTrainConfig, ["lora=3"], r"lora must be a mapping of keys or null, got 3"),
    (PrmTrainConfig, ["prm.data_path=x", "model=3"], r"model must be a mapping of keys, got 3"),
    (PrmTrainConfig, ["prm.data_path=x", "task.name=jsonl"], r"task.train_path is required"),
    (TrainConfig, ["lora.r=4"], r"unknown key 'lora'; valid top-level keys: credit, critic, model, objective, optim, preset, "),
])
def test_each_schema_reports_its_own_keys(schema, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, schema=schema)


def test_a_null_section_that_cannot_be_null_is_left_as_it_is(tmp_path):
    assert load_config(write(tmp_path, "critic:\nrun: {steps: 3}\n")).critic == TrainConfig().critic


def test_sections_descriptions_and_round_trip_of_the_supervised_schemas(tmp_path):
    assert sections(PreferenceTrainConfig) == {"model": SECTIONS["model"], "task": SECTIONS["task"],
                                               "preference": PreferenceConfig, "lora": LoraConfig,
                                               "optim": SECTIONS["optim"], "run": SECTIONS["run"]}
    assert sections(PrmTrainConfig)["prm"] is PrmConfig
    for cls in (LoraConfig, PreferenceConfig, PrmConfig):
        assert all(help_ for _, _, help_ in describe(cls))
    cfg = load_config(None, ["prm.data_path=x", "lora.r=3", "task.name=arithmetic"], schema=PrmTrainConfig)
    assert load_config(save_config(cfg, tmp_path / "c.yaml"), schema=PrmTrainConfig) == cfg   # a run's config.yaml
