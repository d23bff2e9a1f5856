"""Where the resident set grows over a run: compare_trl.py's settings, one phase at a time.

Samples N rollouts first, then runs N reference forwards and N updates (forward, backward, AdamW step) on them, and
prints the process's RSS after each, with each update's response-token count. Run it under another allocator or
setting to compare (each is read at process start):

    python bench/rss_growth.py --steps 16
    python bench/rss_growth.py --steps 16 --no-retain-heap
    MKL_DISABLE_FAST_MM=1 python bench/rss_growth.py --steps 16
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/rss_growth.py --steps 16
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/rss_growth.py --steps 16

Prints only (no section in docs/benchmarks.md): it is a probe for an open question (train/heap.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP, MAX_NEW, PROMPTS, THREADS, grpo_config  # noqa: E402


def rss_mib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-retain-heap", action="store_true")
    args = ap.parse_args()

    from llmrl.data import make_task
    from llmrl.models.loading import load_model, load_reference
    from llmrl.train.heap import retain_heap
    from llmrl.train.parallel import policy_logprobs
    from llmrl.train.rl import rollout_collector
    from llmrl.train.update import batched_logprobs, trim

    torch.set_num_threads(THREADS)
    if not args.no_retain_heap:
        retain_heap()
    cfg = grpo_config(1e-6, [])
    model, tok = load_model(cfg.model.name, dtype=torch.float32)
    model.config.use_cache = False
    ref = load_reference(cfg.model.name, dtype=torch.float32)
    stream = make_task(cfg.task.name, seed=cfg.task.seed, options=cfg.task.options).train_stream(0)
    collect = rollout_collector(cfg)
    gen = torch.Generator().manual_seed(0)
    amp = dict(autocast_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    rollouts, trace = [], []
    for _ in range(args.steps):
        rollouts.append(collect(model, tok, [next(stream) for _ in range(PROMPTS)], group_size=GROUP,
                                max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, generator=gen,
                                chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt, **amp))
        trace.append(rss_mib())
    print("after each rollout, MiB:", trace)
    trace = []
    for r in rollouts:
        batched_logprobs(ref, r, micro_batch_size=PROMPTS * GROUP, temperature=1.0, pack_tokens=cfg.optim.pack_tokens,
                         **amp)
        trace.append(rss_mib())
    print("after each reference forward, MiB:", trace)
    trace = []
    for r in rollouts:
        part = trim(r)
        mask = part.response_mask
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, entropy = policy_logprobs(model, part.input_ids, part.attention_mask, mask.shape[1],
                                            temperature=1.0, pack_tokens=cfg.optim.pack_tokens)
        loss = -(logp.float() * mask).sum() / mask.sum() - 0.01 * entropy.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trace.append((rss_mib(), int(mask.sum())))
    print("after each update, (MiB, response tokens):", trace)


if __name__ == "__main__":
    main()
