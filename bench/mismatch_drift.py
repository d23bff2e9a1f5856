"""Rollout-engine log-prob drift: how far the log-probs an engine records for the tokens it sampled are from the
trainer's own log-probs of the same tokens (the packed, bf16-autocast forward the update uses). That gap is the
training-inference mismatch the corrections of objectives/mismatch.py (TIS, MIS, ICEPOP, ...) exist for.

    python bench/mismatch_drift.py                                 # native engines only (the project's .venv)
    .venv-vllm/bin/python bench/mismatch_drift.py --write          # + vLLM (scripts/setup_vllm.sh), to docs/

Engines: `native` is llmrl's sampler as training runs it (the lean decoder with its C decode kernels, fp32 master
weights under bf16 autocast); `native-hf` is the same sampler over Hugging Face's forward; `vllm` is llmrl's
in-process vLLM engine (bf16 weights). Per engine, over every sampled token (delta = log mu - log pi, mu the
engine, pi the trainer):

    mean delta         the k1 estimate of KL(mu || pi) per token (tokens are drawn from mu)
    k3                 mean of exp(-delta) - 1 + delta: the k3 estimate of the same KL, never negative
    |delta| p50 / p99 / max
    seq |sum delta| p99   the sequence log-ratio a sequence-level correction (tis_seq, mis_seq) sees
    outside [1/2, 2]   the fraction of tokens whose ratio pi / mu ICEPOP's default mask would drop

The native sampler runs the trainer's own model code, so its drift is the floor set by bf16 rounding alone
(decode and prefill sum in a different order); it is the zero-mismatch reference the others compare to.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import markdown_table, write_section  # noqa: E402

from llmrl.compute.logprobs import response_logprobs  # noqa: E402
from llmrl.data import make_task  # noqa: E402
from llmrl.models import load_model, resolve_model_path  # noqa: E402
from llmrl.rollout.collect import encode_prompt, stop_ids  # noqa: E402
from llmrl.rollout.sampler import generate  # noqa: E402

MODEL = "smollm2-135m-instruct"


def trainer_logprobs(policy, samples, temperature: float) -> torch.Tensor:
    """log pi [N, T] of the sampled tokens under the trainer's forward (bf16 autocast, as the update)."""
    ids = torch.cat([samples.prompt_ids, samples.response_ids], 1)                     # [N, P+T]
    mask = torch.cat([samples.prompt_mask, samples.response_mask], 1)                  # [N, P+T]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = response_logprobs(policy, ids, mask, samples.response_ids.shape[1], temperature=temperature,
                                    with_entropy=False)
    return logp.float()


def drift_stats(logp_engine: torch.Tensor, logp_trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Scalars over the chosen tokens of [N, T] log-probs (see the module docstring)."""
    chosen = mask.bool()
    delta = (logp_engine - logp_trainer)[chosen]                                        # [M]
    seq = ((logp_engine - logp_trainer) * mask).sum(-1).abs()                           # [N]
    ratio = torch.exp(-delta)                                                           # pi / mu
    q = torch.quantile(delta.abs(), torch.tensor([0.5, 0.99]))
    return {"tokens": int(chosen.sum()), "mean delta": float(delta.mean()),
            "k3": float((ratio - 1 + delta).mean()), "|delta| p50": float(q[0]), "|delta| p99": float(q[1]),
            "|delta| max": float(delta.abs().max()), "seq |sum delta| p99": float(torch.quantile(seq, 0.99)),
            "outside [1/2, 2]": float(((ratio < 0.5) | (ratio > 2.0)).float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arithmetic", help="arithmetic | gsm8k | reasoning_gym:NAME")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="rounds of sampling per engine, each on new prompts")
    p.add_argument("--engines", default="native,native-hf,vllm", help="vllm is skipped where it is not installed")
    p.add_argument("--write", action="store_true", help="write the mismatch_drift section of docs/benchmarks.md")
    args = p.parse_args()
    torch.manual_seed(0)
    policy, tok = load_model(MODEL)                 # the trainer's policy: fp32 master weights, bf16 autocast
    policy.eval()
    task = make_task(args.task, seed=0, options={})
    stops, pad = stop_ids(tok), tok.pad_token_id
    kw = dict(group_size=args.group, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              stop_ids=stops, pad_id=pad)
    engines = {
        "native": lambda prompts, seed: generate(policy, prompts, autocast_dtype=torch.bfloat16,
                                                 generator=torch.Generator().manual_seed(seed), **kw),
        "native-hf": lambda prompts, seed: generate(policy, prompts, autocast_dtype=torch.bfloat16, lean=False,
                                                    generator=torch.Generator().manual_seed(seed), **kw),
    }
    closers = []
    wanted = args.engines.split(",")
    if "vllm" in wanted:
        from llmrl.rollout.vllm_engine import VLLMEngine, vllm_available
        if vllm_available():
            engine = VLLMEngine(resolve_model_path(MODEL), dtype="bfloat16", seed=0, options={"max_model_len": 1024})
            engines["vllm"] = lambda prompts, seed: engine.generate(prompts, seed=seed, **kw)
            closers.append(engine.close)
        else:
            print("vllm is not installed here: run this with the vLLM venv's python (scripts/setup_vllm.sh)")
    engines = {k: v for k, v in engines.items() if k in wanted}
    examples = task.heldout(args.prompts * args.rounds)
    rows, t0 = [], time.perf_counter()
    for name, sample in engines.items():
        engine_lp, trainer_lp, masks = [], [], []
        for r in range(args.rounds):
            prompts = [encode_prompt(tok, ex.prompt) for ex in examples[r * args.prompts:(r + 1) * args.prompts]]
            s = sample(prompts, r)
            T = s.response_ids.shape[1]
            pad_to = args.max_new_tokens - T                                           # rounds differ in length
            engine_lp.append(torch.nn.functional.pad(s.logp.float() * s.response_mask, (0, pad_to)))
            trainer_lp.append(torch.nn.functional.pad(trainer_logprobs(policy, s, args.temperature), (0, pad_to)))
            masks.append(torch.nn.functional.pad(s.response_mask.float(), (0, pad_to)))
        stats = drift_stats(torch.cat(engine_lp), torch.cat(trainer_lp), torch.cat(masks))
        print(name, {k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()}, flush=True)
        rows.append([name, stats["tokens"], *(f"{stats[k]:.2e}" for k in list(stats)[1:])])
    for close in closers:
        close()
    cols = ["engine", "tokens", "mean delta (k1 KL)", "k3 KL", "abs delta p50", "abs delta p99", "abs delta max",
            "abs seq sum delta p99", "outside [1/2, 2]"]   # no '|' in a markdown table's header
    body = (f"{time.perf_counter() - t0:.0f} s in all: {args.task}, "
            f"{args.rounds} x {args.prompts} prompts x {args.group} samples, at most {args.max_new_tokens} new tokens, "
            f"temperature {args.temperature}, SmolLM2-135M-Instruct. delta = log mu (engine) - log pi (the trainer's "
            "packed bf16 forward) per sampled token, in nats; see bench/mismatch_drift.py.\n\n")
    body += markdown_table(cols, rows)
    print(body)
    if args.write:
        write_section("mismatch_drift", "Rollout-engine log-prob drift against the trainer", body)


if __name__ == "__main__":
    main()
