"""Teacher signals end to end on the tiny model: a teacher with another tokenizer is refused; self-distillation
swaps only the prompts; on-policy distillation (checkpoint and self), SFT and rejection-sampling FT each run one
step from their example configs; rejection-sampling rounds account for what they sampled and kept."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmrl.cli import main
from llmrl.compute.settings import Execution
from llmrl.config_loader import load_config
from llmrl.data import Example
from llmrl.models import load_model
from llmrl.rollout.collect import collect_rollout, encode_prompt
from llmrl.runio.metrics import read_metrics
from llmrl.train import rft
from llmrl.train.checks import check_credit_sources
from llmrl.train.teacher import Teacher, check_same_tokenizer, hinted_prompt, make_teacher, teacher_logprobs

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.name=tiny", "model.autocast=none", "task.heldout_size=2", "rollout.prompts_per_step=2",
         "rollout.group_size=2", "rollout.max_new_tokens=4", "run.eval_max_new_tokens=4", "run.steps=1",
         "run.eval_every=0", "run.progress=false", "run.threads=1"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, tok = load_model("tiny")
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_checkpoint):
    _, student = load_model("tiny")
    other = load_model(str(tiny_checkpoint))[1]
    check_same_tokenizer(student, other, "same")                 # the same tokenizer passes
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="does not share the student's tokenizer.*vocabulary size"):
        check_same_tokenizer(student, other, "x")
    model = load_model(str(tiny_checkpoint))[0]
    model.resize_token_embeddings(len(other))
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    cfg = load_config(None, ["model.name=tiny", f"teacher.path={tmp_path / 'other'}"])
    with pytest.raises(ValueError, match="does not share the student's tokenizer"):
        make_teacher(cfg, student)
    assert main(["train", *SMALL, f"run.output_dir={tmp_path}", f"teacher.path={tmp_path / 'other'}",
                 "credit.estimator=teacher_kl"]) != 0


def test_config_checks():
    with pytest.raises(ValueError, match="needs a teacher"):
        check_credit_sources(load_config(None, ["credit.estimator=teacher_kl"]))
    with pytest.raises(Exception, match="teacher.path"):
        load_config(None, ["teacher.source=checkpoint"])
    assert load_config(None, ["teacher.source=self"]).teacher.hint.format(answer=1, demonstration="d")
    with pytest.raises(Exception, match="teacher.estimator=exact is a loss term"):
        load_config(None, ["teacher.source=self", "teacher.estimator=exact", "objective.update=trpo"])
    with pytest.raises(Exception, match="estimator"):
        load_config(None, ["teacher.source=self", "teacher.estimator=exakt"])


def test_self_distillation_reads_the_hinted_prompt_and_the_same_response(tiny):
    model, tok = tiny
    exs = [Example("What is 1 + 2?", "3", {"expression": "1 + 2"}), Example("Say 12", "12")]
    rollout = collect_rollout(model, tok, exs, group_size=2, max_new_tokens=5, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    hint = " (answer: {answer})"
    r = SimpleNamespace(teacher=Teacher(None, hint, 0.5), model=model, tokenizer=tok, ex=Execution(micro_batch_size=3),
                        prompt_kw={"chat_template": True, "system_prompt": None})
    out, stats = teacher_logprobs(r, rollout)
    lt, rew = out.extras["logp_teacher"], out.extras["teacher_rewards"]
    assert hinted_prompt(exs[0], hint) == "What is 1 + 2? (answer: 3)"
    for i in range(len(rollout.completions)):                      # slow: one row, unpadded, by hand
        n = int(rollout.response_mask[i].sum())
        p = encode_prompt(tok, hinted_prompt(rollout.examples[i], hint))
        resp = rollout.response_ids[i, :n].tolist()
        logits = model(torch.tensor([p + resp])).logits.log_softmax(-1)[0]
        ref = torch.stack([logits[len(p) + j - 1, t] for j, t in enumerate(resp)])
        torch.testing.assert_close(lt[i, :n], ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(rew[i, :n], -0.5 * (rollout.logp_old[i, :n] - ref), atol=1e-4, rtol=0)
    assert stats["teacher_kl_per_seq"] == pytest.approx(float(((rollout.logp_old - lt) * rollout.response_mask)
                                                               .sum(-1).mean()), abs=1e-5)


@pytest.mark.parametrize("name, extra", [("distill_arithmetic.yaml", []),
                                         ("distill_arithmetic.yaml", ["credit.options.outcome=grpo"]),
                                         ("distill_arithmetic.yaml", ["teacher.estimator=exact"]),
                                         ("distill_self_arithmetic.yaml", []),
                                         ("distill_self_arithmetic.yaml", ["teacher.estimator=exact"])])
def test_distillation_examples_run_one_step(name, extra, tmp_path, tiny_checkpoint):
    assert main(["train", str(ROOT / "examples" / name), *SMALL, *extra, f"run.output_dir={tmp_path}", "run.name=r",
                 f"teacher.path={tiny_checkpoint}"]) == 0
    train = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["teacher_kl_per_seq"] is not None
    exact = "teacher.estimator=exact" in extra
    assert (train[0].get("teacher_kl_exact") is not None) == exact
    if name == "distill_arithmetic.yaml":    # the student is the teacher's own weights: the per-token term is ~0
        assert abs(train[0]["teacher_kl_per_seq"]) < 1e-3
        assert not exact or 0 <= train[0]["teacher_kl_exact"] < 1e-4
    elif exact:                              # the hinted prompt changes the teacher's distribution
        assert train[0]["teacher_kl_exact"] > 1e-4


def test_exact_distillation_gradient_matches_a_plain_forward(tiny):
    """teacher.estimator=exact through the update's micro-batches (padded, two of them) against each row's own
    unpadded forward of student and teacher: coef * token-mean of KL(pi || pi_teacher) over the chosen tokens,
    the only loss when the advantages are 0."""
    from functools import partial

    from llmrl.compute.batches import batched_full_logprobs
    from llmrl.objectives.policy import BatchCounts, ppo_clip_objective
    from llmrl.train.update import accumulate

    model, tok = tiny
    teacher, _ = load_model("tiny")
    with torch.no_grad():                     # another policy: the tiny weights, perturbed
        g = torch.Generator().manual_seed(1)
        for prm in teacher.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.05)
    exs = [Example("What is 1 + 2?", "3", {"expression": "1 + 2"}), Example("Say 12", "12")]
    rollout = collect_rollout(model, tok, exs, group_size=2, max_new_tokens=5, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    ex = Execution(micro_batch_size=3)
    rollout = rollout.with_(teacher_logp_all=batched_full_logprobs(teacher, rollout, ex))
    N, T = rollout.response_mask.shape
    counts, coef = BatchCounts.of(rollout.response_mask), 0.7
    model.train()
    model.zero_grad()
    sums, _ = accumulate(model, rollout, torch.arange(N), torch.zeros(N, T), partial(ppo_clip_objective), counts, ex,
                         logp_old=None, critic=None, engine_correction=None, chosen=[], teacher_coef=coef)
    got = [prm.grad.clone() for prm in model.parameters()]
    model.zero_grad()
    total = 0.0
    for i in range(N):                        # slow: one row, no padding, plain forwards
        n, real = int(rollout.response_mask[i].sum()), rollout.attention_mask[i].bool()
        ids = rollout.input_ids[i][real][None]
        P = int(real[:rollout.prompt_len].sum())
        logp = model(ids).logits.float().log_softmax(-1)[0, P - 1:P - 1 + n]           # [n, V]
        with torch.no_grad():
            logq = teacher(ids).logits.float().log_softmax(-1)[0, P - 1:P - 1 + n]
        total = total + (logp.exp() * (logp - logq)).sum()
    loss = coef * total / counts.num_tokens
    loss.backward()
    value = float(loss.detach())
    assert sums["loss_teacher_kl"] == pytest.approx(value, rel=1e-4)
    assert sums["teacher_kl_exact"] == pytest.approx(value / coef, rel=1e-4) and value > 1e-3
    for a, b in zip(got, (prm.grad for prm in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


SUPERVISED_SMALL = ["model.name=tiny", "model.autocast=none", "task.heldout_size=2", "run.eval_max_new_tokens=4",
                    "run.progress=false", "run.threads=1", "run.steps=1", "run.save_every=0"]


def test_sft_example_runs_one_step(tmp_path):
    assert main(["sft", str(ROOT / "examples" / "sft_arithmetic.yaml"), *SUPERVISED_SMALL, "sft.build_examples=20",
                 "sft.batch_size=4", "optim.micro_batch_size=4", "run.eval_every=0",
                 f"run.output_dir={tmp_path}", "run.name=s"]) == 0
    assert (tmp_path / "s" / "final" / "model.safetensors").exists()


def test_sft_data_command_writes_worked_answers(tmp_path):
    assert main(["sft-data", "--task", "arithmetic", "--n", "5", "--out", str(tmp_path / "d.jsonl")]) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 5


def test_rejection_sampling_accounting():
    completions = ["Answer: 5", "Answer: 5", " Answer: 5 ", "Answer: 6", "x",       # prompt 0
                   "a", "b", "c", "d", "e",                                          # prompt 1: none pass
                   "p", "q", "r", "s", "t"]                                          # prompt 2: all pass, distinct
    scores = [1, 1, 1, 1, 0] + [0] * 5 + [1] * 5
    kept, stats = rft.accept(completions, [float(s) for s in scores], group_size=5, max_per_prompt=3)
    assert kept == [0, 3, 10, 11, 12]          # duplicates (after stripping) once; at most 3 a prompt
    assert stats == {"sampled": 15, "passing": 9, "accepted": 5, "acceptance_rate": 9 / 15, "prompts": 3,
                     "prompts_solved": 2}
    with pytest.raises(ValueError, match="group_size"):
        rft.accept(completions[:4], [1.0] * 4, group_size=5, max_per_prompt=1)


def test_rft_rounds_train_on_what_passed_and_resume(tmp_path, monkeypatch):
    """The tiny model never solves arithmetic: the scorer is replaced by one passing every completion whose first
    character is in the first half of the alphabet of what was sampled, so rounds have something to keep."""

    def fake_score(completions, examples, terms):
        return SimpleNamespace(total=torch.tensor([float(len(c) % 2 == 0) for c in completions]))

    monkeypatch.setattr(rft, "score", fake_score)
    args = ["rft", str(ROOT / "examples" / "rft_arithmetic.yaml"), *SUPERVISED_SMALL[:-2], "rft.rounds=2",
            "rft.prompts_per_round=3", "rft.samples_per_prompt=4", "rft.max_new_tokens=5", "sft.batch_size=4",
            "optim.micro_batch_size=4", f"run.output_dir={tmp_path}", "run.name=x"]
    assert main(args) == 0
    rounds = [r for r in read_metrics(tmp_path / "x" / "rounds.jsonl")]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["sampled"] == 12 and r["acceptance_rate"] == pytest.approx(r["passing"] / 12)
        assert 0 < r["accepted"] <= r["passing"]
        assert r["steps"] == -(-r["accepted"] // 4)                 # one epoch of batches of 4
        accepted = (tmp_path / "x" / f"round_{r['round']}" / "accepted.jsonl").read_text().splitlines()
        assert len(accepted) == r["accepted"]
    assert rounds[1]["checkpoint"].endswith("round_2/final")
    mtime = (tmp_path / "x" / "round_1" / "final" / "model.safetensors").stat().st_mtime
    assert main(args) == 0                                           # resumed: both rounds done, nothing re-run
    assert (tmp_path / "x" / "round_1" / "final" / "model.safetensors").stat().st_mtime == mtime
