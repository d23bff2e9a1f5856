"""The trust-region lab: how far does each objective really move the policy per step?

For ppo_clip, gspo, cispo, dppo, KL-only (no clip, a k2 penalty on KL(pi || pi_old)) and TRPO, from the same start,
at one learning rate, with the same prompts and sampling seeds (the batches are the same at step 1 and diverge only
as the policies do), each step reuses its rollout over `--minibatches` optimizer steps (the trust region acts only
when data is reused) and the bench measures

  - the realised EXACT KL(pi_old || pi_new) of the step: the full next-token distributions before and after the
    update on every response position, summed over a sequence's tokens; mean and tail (p95, max) over sequences;
  - the clip or mask fraction the objective reports (TRPO: none);
  - the batch reward per step (the current policy's samples), and greedy held-out accuracy after N steps.

TRPO's step is the ground truth of "how far did we move": it moves exactly to its bound (a k3 estimate of
KL(old || new) <= max_kl per token), by line search.

    python bench/trust_region.py --steps 30 --minibatches 4                          # the full lab (hours on 2 cores)
    python bench/trust_region.py --steps 2 --heldout 8 model.name=tiny --doc /tmp/x.md   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOC, markdown_table, peak_rss_mib, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, list[str]] = {
    "ppo_clip": ["objective.name=ppo_clip", "objective.clip_low=0.2", "objective.clip_high=0.2"],
    "gspo": ["objective.name=gspo", "objective.clip_low=3e-4", "objective.clip_high=4e-4",
             "objective.aggregation=seq-mean-token-mean"],
    "cispo": ["objective.name=cispo", "objective.clip_low=1.0", "objective.clip_high=4.0"],
    "dppo": ["objective.name=dppo", "objective.options={divergence: tv, delta_low: 0.1, delta_high: 0.1}"],
    "kl_only": ["objective.name=ppo_clip", "objective.clip_low=1.0", "objective.clip_high=1e9",
                "objective.kl_estimator=k2"],
    # micro-batches of 8 rows bound the Fisher-vector products' double-backward graph (the whole batch's grew to
    # 24 GB here and was killed; 8-row parts peaked at 12.8 GiB); they change memory and time, not the step
    "trpo": ["objective.update=trpo", "objective.max_kl=0.01", "objective.kl_estimator=k3", "optim.micro_batch_size=8"],
}


def full_logprobs(model, rollout, temperature: float, rows: int = 8) -> list[torch.Tensor]:
    """log pi(. | s_t) over the vocabulary at every response position, per chunk of rows: [n, T, V] each."""
    P, out = rollout.prompt_len, []
    model.eval()
    with torch.no_grad():
        for i in range(0, rollout.input_ids.shape[0], rows):
            logits = model(input_ids=rollout.input_ids[i:i + rows],
                           attention_mask=rollout.attention_mask[i:i + rows]).logits[:, P - 1:-1].float()
            out.append(torch.log_softmax(logits / (temperature or 1.0), -1))
    model.train()
    return out


def exact_kl_per_sequence(old: list[torch.Tensor], new: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """sum over a sequence's chosen positions of KL(pi_old(. | s_t) || pi_new(. | s_t)) -> [N] nats."""
    per_token = torch.cat([(o.exp() * (o - n)).sum(-1) for o, n in zip(old, new)])     # [N, T]
    return (per_token * mask).sum(-1)


def run_method(name: str, args, save=lambda record: None) -> dict:
    """`--steps` steps of one method; returns its per-step records and the held-out accuracy after them. `save`
    gets the record so far after every step (accuracy None until the end): a run cut short keeps its steps."""
    from llmrl.config_loader import load_config
    from llmrl.credit import CreditInputs
    from llmrl.objectives.kl import FixedKLController
    from llmrl.presets import PRESETS
    from llmrl.train.build import build
    from llmrl.train.evaluate import evaluate

    cfg = load_config(ROOT / "examples/arithmetic_base.yaml", [
        "preset=grpo", "objective.kl_coef=0.0", "objective.aggregation=token-mean", f"optim.lr={args.lr}",
        f"objective.minibatches={args.minibatches}", f"run.steps={args.steps}", f"task.heldout_size={args.heldout}",
        "run.eval_every=0", "run.progress=false", "run.samples_every=0", f"run.output_dir={args.out_dir}",
        f"run.name={name}", "run.resume=never", *METHODS[name], *args.overrides], presets=PRESETS)
    r = build(cfg)
    if name == "kl_only":          # the penalty's "reference" is pi_old, the policy before each step
        r.beta = FixedKLController(args.kl_beta)
    steps = []
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        sampled = r.sample(r, next(r.batches))
        rollout = sampled.rollout
        for stage in r.stages:
            rollout, _ = stage(r, rollout)
        old = full_logprobs(r.model, rollout, r.ex.temperature)
        if name == "kl_only":
            rollout = rollout.with_(logp_ref=torch.cat(old).gather(-1, rollout.response_ids[..., None])[..., 0])
        credit = r.estimator(CreditInputs(scores=sampled.rewards.total, response_mask=rollout.response_mask,
                                          group_ids=rollout.group_ids))
        upd = r.update(r, rollout, credit)
        kl = exact_kl_per_sequence(old, full_logprobs(r.model, rollout, r.ex.temperature), rollout.response_mask)
        steps.append({"step": step, "reward": float(sampled.rewards.total.mean()), "kl_mean": float(kl.mean()),
                      "kl_p95": float(kl.quantile(0.95)), "kl_max": float(kl.max()),
                      "clip_fraction": upd.get("clip_fraction"), "seconds": time.perf_counter() - t,
                      "peak_rss_mib": peak_rss_mib(),   # the process's peak so far
                      **{k: v for k, v in upd.items() if k.startswith("trpo_") or k == "update_rows"}})
        print(name, steps[-1], flush=True)
        save({"steps": steps, "accuracy": None})
    ev = evaluate(r.model, r.tokenizer, r.heldout, max_new_tokens=r.eval_tokens, autocast_dtype=r.ex.autocast_dtype,
                  collect=r.collect, **r.prompt_kw)
    r.metrics_log.close()
    r.samples_log.close()
    return {"steps": steps, "accuracy": ev["accuracy"]}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def report(results: dict, args) -> None:
    from llmrl.report.charts import Series, line_chart, standalone_svg

    rows = []
    for name, res in results.items():
        s = res["steps"]
        moved = [x for x in s if x["kl_max"] > 0]      # a step whose advantages are all 0 makes no update
        rows.append([name, f"{len(moved)}/{len(s)}", mean([x["kl_mean"] for x in moved]),
                     mean([x["kl_p95"] for x in moved]), max(x["kl_max"] for x in s),
                     mean([x["clip_fraction"] for x in moved]) if name != "trpo" else "–",
                     s[0]["reward"], mean([x["reward"] for x in s[-3:]]),
                     "not run: stopped early" if res["accuracy"] is None else res["accuracy"]])
    fig = Path(args.doc).parent / "figures" / f"trust_region{args.figure_suffix}.svg"
    fig.parent.mkdir(parents=True, exist_ok=True)
    fig.write_text(standalone_svg(line_chart("exact KL(pi_old || pi_new) per sequence, mean over the batch",
                                             [Series(n, [(x["step"], x["kl_mean"]) for x in res["steps"]])
                                              for n, res in results.items()], width=560, height=300)))
    body = (f"{args.note}\n\n" if args.note else "") + (
        f"{args.steps} steps per method from the same start, {args.minibatches} minibatches per rollout, lr {args.lr} "
        f"(TRPO: max_kl 0.01 instead), KL-only beta {args.kl_beta} (k2 on KL(pi || pi_old)), overrides "
        f"`{' '.join(args.overrides) or 'none'}`. KL columns: the exact KL(pi_old || pi_new) of a step summed over a "
        "sequence's response tokens (nats), averaged over the steps that updated (mean, p95 over sequences: a step "
        "whose advantages are all 0 makes no update) and the largest seen; "
        "reward: the batch's mean reward at step 1 and over the last 3 steps; accuracy: greedy held-out after the "
        f"last step.\n\n")
    body += markdown_table(["method", "steps updated", "KL mean", "KL p95", "KL max", "clip/mask fraction",
                            "reward step 1", "reward last 3", "held-out acc"], rows)
    body += f"\n\n![exact KL per step]({fig.relative_to(Path(args.doc).parent)})\n"
    write_section("trust_region", "Trust-region lab: how far each objective moves the policy", body, doc=Path(args.doc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-beta", type=float, default=1.0)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--out-dir", default="runs/bench_trust_region",
                   help="run folders and trust_region.json (a call adds or replaces the methods it runs)")
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--figure-suffix", default="")
    p.add_argument("--note", default="", help="a line above the table (e.g. 'SMOKE RUN: ...')")
    p.add_argument("--report-only", action="store_true", help="write the table from --out-dir's trust_region.json")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every method")
    args = p.parse_args()
    torch.manual_seed(0)
    saved = Path(args.out_dir) / "trust_region.json"      # each method's record as soon as it ends; a later
    results = json.loads(saved.read_text()) if saved.exists() else {}     # call adds or replaces its methods
    saved.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, record: dict) -> None:
        results[name] = record
        saved.write_text(json.dumps(results, indent=1))
    for name in [] if args.report_only else args.methods.split(","):
        save(name, run_method(name, args, partial(save, name)))
    report(results, args)


if __name__ == "__main__":
    main()
