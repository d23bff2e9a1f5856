"""Update-phase efficiency: the fraction of the machine's measured bf16 matmul peak that llmrl's update reaches.

1. Peak: the median GFLOP/s (2 n^3 / seconds) of `torch.matmul` of two n x n matrices, n in --sizes, on
   --threads threads, in bf16 and in fp32; the peak of a dtype is the best of those medians.
2. Update: `policy_update` (PPO clip, token-mean, bf16 autocast over fp32 master weights, AdamW step) on
   SmolLM2-135M-Instruct with a synthetic rollout of --rows sequences: prompts of 36-44 tokens (left-padded),
   responses of mixed lengths 4-64 (right-padded), one micro-batch; padded and packed; median of --repeats
   timed calls after one warm-up.
3. Useful FLOPs of one update, counted analytically (recomputation and padding are not useful work):

       6 * (P_layers * sum_i n_i  +  P_head * R)  +  6 * n_layers * d_attn * sum_i n_i (n_i + 1)

   n_i = real tokens of row i (prompt + response), R = response tokens, P_layers = weights of the decoder
   layers' linear maps, P_head = V x H (the LM head, applied only at response positions); 6 = 2 (multiply-add)
   x 3 (forward, and backward's two matmuls). Attention: Q K^T and A V are each 2 d_attn FLOPs per
   (query, key) pair, n(n+1)/2 causal pairs, x3 for backward; d_attn = heads x head_dim.

    python bench/update_efficiency.py                  # print the tables
    python bench/update_efficiency.py --write          # and rewrite the section of docs/benchmarks.md
    python bench/update_efficiency.py --profile        # torch.profiler's top ops of one packed update

Where the default's time goes (a table in the written section): one more update of the default arm timed op by
op under a TorchDispatchMode (`op_breakdown`), wall seconds summed by kind of op. torch.profiler is not used for
this: with it on, the small elementwise ops of this update took 4-5x their time without it (silu on [3, 384, 1536]
2.0 ms a call against 0.5 ms, 2026-12-04), which made them look like most of the update.

The process keeps freed memory in its heap (`compute/heap.py`, `retain_heap`), as a training run does by default.

Two clocks: wall seconds (the figure that matters on an idle machine) and the process's CPU seconds, both
for the peak and for the update. On a shared machine the wall clock also counts time the threads waited for
a core; GFLOP per CPU-second does not, so the CPU-time fraction is the one to read under load: exact with
`--threads 1`; with more threads set OMP_WAIT_POLICY=PASSIVE, or the CPU time also counts threads spinning at
barriers while their partner waits for a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import markdown_table, write_section  # noqa: E402

from llmrl.compute.fused import fuse_decoder_ops  # noqa: E402
from llmrl.models import load_model  # noqa: E402
from llmrl.objectives.policy import ppo_clip_objective  # noqa: E402
from llmrl.rollout.types import Rollout  # noqa: E402
from llmrl.compute.heap import retain_heap  # noqa: E402
from llmrl.compute.settings import Execution  # noqa: E402
from llmrl.train.update import Passes, policy_update  # noqa: E402

# kinds of aten op for the breakdown, by op name (the rest: "elementwise and other")
OP_KINDS = {"matmul": ("mm", "bmm", "addmm", "matmul", "linear"),
            "attention (SDPA forward and backward)": ("_scaled_dot_product_flash_attention_for_cpu",
                                                      "_scaled_dot_product_flash_attention_for_cpu_backward"),
            "optimizer and gradient clipping": ("_fused_adamw_", "_foreach_norm", "_foreach_mul_", "_foreach_add_",
                                                "_foreach_div_"),
            "dtype casts": ("_to_copy",)}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of fn() over `repeats` calls, after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per CPU second) of an n x n x n matmul, medians."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    wall, cpu = timed(lambda: torch.matmul(a, b), repeats)
    return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def synthetic_rollout(rows: int, vocab: int, pad_id: int, seed: int = 0) -> Rollout:
    """`rows` sequences in the rollout layout: prompts of 36-44 tokens, responses of 4-64 (one of 64)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(36, 45, (rows,), generator=g)
    response = torch.randint(4, 65, (rows,), generator=g)
    response[0] = 64
    P, T = int(prompt.max()), int(response.max())
    cols = torch.arange(P + T)
    mask = ((cols >= P - prompt[:, None]) & (cols < P + response[:, None])).long()     # [N, P+T]
    ids = torch.where(mask.bool(), torch.randint(0, vocab, (rows, P + T), generator=g), pad_id)
    return Rollout(input_ids=ids, attention_mask=mask, response_mask=mask[:, P:].float(), logp_old=torch.zeros(rows, T),
                   group_ids=torch.arange(rows) // 4, completions=[""] * rows, examples=[None] * rows)


def useful_flops(model, rollout: Rollout) -> float:
    """Forward + backward FLOPs of the work the update needs (see the module docstring)."""
    cfg = model.config
    n = rollout.attention_mask.sum(-1).double()                                          # [N]
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    n_layers = len(model.get_decoder().layers)
    return flops_linear(model, rollout) + float(6 * n_layers * d_attn * (n * (n + 1)).sum())


def flops_linear(model, rollout: Rollout) -> float:
    """The linear layers' and LM head's share of `useful_flops` (no attention): what the matmuls compute."""
    layers = model.get_decoder().layers
    p_layers = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    p_head = model.get_output_embeddings().weight.numel()
    return float(6 * (p_layers * rollout.attention_mask.sum() + p_head * rollout.response_mask.sum()))


def update_fn(model, optimizer, rollout, advantages, *, pack_tokens, micro_batch_size, autocast_dtype):
    """One `policy_update` call as a function of nothing: one epoch, one minibatch, PPO clip."""
    ex = Execution(autocast_dtype=autocast_dtype, pack_tokens=pack_tokens, micro_batch_size=micro_batch_size,
                   max_len=rollout.response_mask.shape[1])
    return partial(policy_update, model, optimizer, rollout, advantages, partial(ppo_clip_objective), ex,
                   Passes(max_grad_norm=1.0), skip_zero_advantage=True)


def op_breakdown(fn) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall seconds of one fn() call, {kind: (wall seconds in that kind of aten op, calls)}), each op timed
    alone under a TorchDispatchMode (OP_KINDS; backward ops included: the autograd engine runs them on this
    thread for CPU tensors). The mode's own cost per op (~10 us) is in the call's time, not in the ops'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    spent: dict[str, list] = {kind: [0.0, 0] for kind in [*OP_KINDS, "elementwise and other"]}

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            cell = spent[kind_of.get(func.overloadpacket.__name__, "elementwise and other")]
            cell[0] += time.perf_counter() - t
            cell[1] += 1
            return out

    t = time.perf_counter()
    with Timer():
        fn()
    return time.perf_counter() - t, {k: (v[0], v[1]) for k, v in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="2048,3072,4096", help="matmul sizes n for the peak")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--pack-tokens", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one packed update")
    p.add_argument("--write", action="store_true", help="rewrite the update_efficiency section of docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retain_heap()                        # as runio/runs.py does (run.retain_heap, on by default)

    peaks = {}   # dtype -> (GFLOP per wall second, GFLOP per CPU second)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        per_size = {n: matmul_gflops(n, dtype, args.repeats) for n in map(int, args.sizes.split(","))}
        peaks[name] = (max(w for w, _ in per_size.values()), max(c for _, c in per_size.values()))
        print(f"{name} matmul GFLOP/s (wall, per CPU-s) by size: "
              + ", ".join(f"{n}: {w:.0f}, {c:.0f}" for n, (w, c) in per_size.items()), flush=True)

    model, tok = load_model(args.model)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)     # as train/rl.py builds it
    rollout = synthetic_rollout(args.rows, model.config.vocab_size, tok.pad_token_id)
    signs = torch.tensor([1.0, -1.0]).repeat((args.rows + 1) // 2)[:args.rows]
    advantages = signs[:, None] * rollout.response_mask
    flops = useful_flops(model, rollout)
    real, padded = int(rollout.attention_mask.sum()), rollout.attention_mask.numel()
    print(f"rollout: {args.rows} rows, {real} real tokens of {padded} ({rollout.response_mask.sum():.0f} response); "
          f"useful work {flops / 1e12:.3f} TFLOP per update", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        run = update_fn(model, optimizer, rollout, advantages, pack_tokens=args.pack_tokens,
                        micro_batch_size=args.micro_batch_size, autocast_dtype=torch.bfloat16)
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    arms = [("padded, bf16 autocast", None, torch.bfloat16, False),
            (f"packed ({args.pack_tokens}), bf16 autocast", args.pack_tokens, torch.bfloat16, False),
            (f"packed ({args.pack_tokens}), bf16 autocast, fused ops (the default)", args.pack_tokens, torch.bfloat16,
             True)]
    rows = []
    for name, pack_tokens, amp, fused in arms:
        if fused:
            fuse_decoder_ops(model)         # compute/fused.py, as train/rl.py does with model.fused_ops (in place)
        wall, cpu = timed(update_fn(model, optimizer, rollout, advantages, pack_tokens=pack_tokens,
                                    micro_batch_size=args.micro_batch_size, autocast_dtype=amp), args.repeats)
        g_wall, g_cpu = flops / wall / 1e9, flops / cpu / 1e9
        default_run = update_fn(model, optimizer, rollout, advantages, pack_tokens=pack_tokens,
                                micro_batch_size=args.micro_batch_size, autocast_dtype=amp)
        rows.append([name, f"{wall:.2f}", f"{real / wall:.0f}", f"{g_wall:.0f}", f"{g_wall / peaks['bf16'][0]:.1%}",
                     f"{cpu:.2f}", f"{g_cpu / peaks['bf16'][1]:.1%}"])
        print(rows[-1], flush=True)

    total, spent = op_breakdown(default_run)        # the last arm: the default
    parts = [[kind, f"{sec:.3f}", f"{sec / total:.0%}", str(calls)] for kind, (sec, calls) in spent.items()]
    parts.append(["outside aten ops (Python, autograd, the timer)", f"{total - sum(s for s, _ in spent.values()):.3f}",
                  f"{1 - sum(s for s, _ in spent.values()) / total:.0%}", "-"])
    mm_s = spent["matmul"][0]
    breakdown = markdown_table(["where the default update's time goes", "wall s", "share", "aten calls"], parts)
    breakdown += (f"\n\nThe matmuls alone run at {flops_linear(model, rollout) / mm_s / 1e9:.0f} GFLOP/s "
                  f"({flops_linear(model, rollout) / mm_s / 1e9 / peaks['bf16'][0]:.0%} of the peak) on the update's "
                  "linear-layer FLOPs.")
    print(breakdown)
    peak_table = markdown_table(["dtype", "matmul peak GFLOP/s (wall)", "GFLOP per CPU-s"],
                                [[k, f"{w:.0f}", f"{c:.0f}"] for k, (w, c) in peaks.items()])
    table = markdown_table(["update", "wall s", "real tokens / s", "useful GFLOP/s", "of bf16 peak (wall)",
                            "CPU s", "of bf16 peak (CPU time)"], rows)
    print(peak_table + "\n\n" + table)
    if args.write:
        body = (f"Peak: median of {args.repeats} n x n matmuls, best n of {args.sizes}, {args.threads} threads. Update: "
                f"`policy_update` on {args.model}, {args.rows} synthetic sequences ({real} real tokens of {padded} "
                f"padded; prompts 36-44, responses 4-64 tokens), one micro-batch, PPO clip, fused AdamW (the last row "
                "with compute/fused.py's lean RMSNorm, SwiGLU and linears, llmrl's default), median of "
                f"{args.repeats} after a warm-up. Useful FLOPs = 6 x (decoder linear weights x real tokens + LM head "
                "x response tokens) + causal attention (bench/update_efficiency.py docstring); "
                f"{flops / 1e12:.3f} TFLOP per update. Wall-clock and CPU-time fractions agree on an idle machine; "
                "under load read the CPU-time one (module docstring).\n\n"
                f"{peak_table}\n\n{table}\n\nOne more update of the default, op by op (module docstring; "
                f"{total:.2f} s with the timer on):\n\n{breakdown}\n")
        write_section("update_efficiency", "Update phase: fraction of the bf16 matmul peak", body)


if __name__ == "__main__":
    main()
