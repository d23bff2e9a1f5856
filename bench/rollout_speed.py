"""Rollout tokens/s on SmolLM2-135M-Instruct: HF `generate`, standalone vLLM, llmrl's native sampler and llmrl's
vLLM engine (its per-step weight sync included). Needs the vLLM venv (scripts/setup_vllm.sh) for the vLLM rows.

    python bench/rollout_speed.py                      # 2 arithmetic prompts x 8 samples, <= 64 new tokens, T = 1
    python bench/rollout_speed.py --repeats 7 --write  # ... and rewrite its section of docs/benchmarks.md

Every engine is built first and warmed up once; then --repeats rounds run each engine once in turn, so that a
change in the machine's load hits all of them alike; the table gives the median over rounds, and the llmrl /
standalone vLLM ratio is the median of the per-round ratios. tokens = generated tokens up to and including the
stop token (EOS), counted alike for every engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import markdown_table, write_section  # noqa: E402

from llmrl.data import make_task  # noqa: E402
from llmrl.models import load_model, resolve_model_path  # noqa: E402
from llmrl.rollout.collect import encode_prompt, stop_ids  # noqa: E402
from llmrl.rollout.sampler import generate  # noqa: E402

MODEL = "smollm2-135m-instruct"


def timed(fn) -> tuple[float, float, float | None]:
    """fn() -> (tokens, weight-sync seconds or None) -> (tokens/s, seconds, sync seconds) of one run."""
    t = time.perf_counter()
    tokens, sync_s = fn()
    secs = time.perf_counter() - t
    return tokens / secs, secs, sync_s


def hf_generate(model, tok, prompts, args):
    ids = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    eos = stop_ids(tok)

    def run():
        with torch.no_grad():
            out = model.generate(**ids, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, num_return_sequences=args.group,
                                 eos_token_id=list(eos), pad_token_id=tok.pad_token_id)
        is_stop = torch.isin(out[:, ids["input_ids"].shape[1]:], torch.tensor(eos)).int()
        return int((is_stop.cumsum(-1) - is_stop == 0).sum()), None   # up to and including the first stop
    return run


def native(policy, tok, prompts, args, amp):
    def run():
        s = generate(policy, prompts, group_size=args.group, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, stop_ids=stop_ids(tok), pad_id=tok.pad_token_id,
                     autocast_dtype=amp)
        return int(s.response_mask.sum()), None
    return run


def standalone_vllm(path, tok, prompts, args):
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", seed=0, kv_cache_memory_bytes=1 << 30, max_model_len=1024)
    params = SamplingParams(n=args.group, temperature=args.temperature, max_tokens=args.max_new_tokens)

    def run():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), None
    return run, llm


def llmrl_vllm(path, policy, tok, prompts, args):
    from llmrl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(path, dtype="bfloat16", seed=0, options={"max_model_len": 1024})
    seed = iter(range(10**6))

    def run():
        s = engine.generate(prompts, group_size=args.group, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, stop_ids=stop_ids(tok), pad_id=tok.pad_token_id,
                            seed=next(seed))
        t = time.perf_counter()
        engine.sync_weights(policy, method=args.sync)
        return int(s.response_mask.sum()), time.perf_counter() - t
    return run, engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engines", default="hf,native,vllm,llmrl-vllm")
    p.add_argument("--sync", default=None, choices=("repack", "reload"), help="weight-sync method (default: auto)")
    p.add_argument("--write", action="store_true", help="rewrite the rollout_speed section of docs/benchmarks.md")
    args = p.parse_args()
    torch.manual_seed(0)
    engines = args.engines.split(",")
    policy, tok = load_model(MODEL)                 # the trainer's policy: fp32 master weights, bf16 autocast
    path = resolve_model_path(MODEL)
    task = make_task("arithmetic", seed=0, options={})
    prompts = [encode_prompt(tok, ex.prompt) for ex in task.heldout(args.prompts)]
    runners, what, closers = {}, {}, []
    if "hf" in engines:
        hf = load_model(MODEL, dtype=torch.bfloat16)[0].eval()
        runners["HF generate"] = hf_generate(hf, tok, prompts, args)
        what["HF generate"] = "transformers `generate`, bf16 weights"
    if "native" in engines:
        runners["llmrl native"] = native(policy.eval(), tok, prompts, args, torch.bfloat16)
        what["llmrl native"] = "KV-cache sampler, fp32 weights + bf16 autocast (as in training)"
    if "vllm" in engines:       # vLLM's defaults: the engine core in its own process; built before llmrl's engine,
        runners["vLLM standalone"], llm = standalone_vllm(path, tok, prompts, args)   # which makes it in-process
        what["vLLM standalone"] = "`LLM.generate`, bf16, engine core in its own process (vLLM's default)"
        closers.append(llm.llm_engine.engine_core.shutdown)
    if "llmrl-vllm" in engines:
        runners["llmrl vLLM engine"], engine = llmrl_vllm(path, policy, tok, prompts, args)
        what["llmrl vLLM engine"] = "in-process vLLM, bf16; a run = generate + push the policy's weights"
        closers.append(engine.close)
    for name, run in runners.items():
        run()                                        # warm-up
    rounds = {name: [] for name in runners}
    for r in range(args.repeats):
        for name, run in runners.items():
            rounds[name].append(timed(run))
        print(r, {name: f"{v[-1][0]:.0f} tok/s" for name, v in rounds.items()}, flush=True)
    for close in closers:
        close()
    rows = []
    for name, runs in rounds.items():
        rates, secs, syncs = zip(*runs)
        sync = f"{statistics.median(syncs):.3f}" if syncs[0] is not None else "-"
        rows.append([name, what[name], f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
                     f"{statistics.median(secs):.2f}", sync])
    if "vLLM standalone" in rounds and "llmrl vLLM engine" in rounds:
        ratio = statistics.median(a[0] / b[0] for a, b in zip(rounds["llmrl vLLM engine"], rounds["vLLM standalone"]))
        print(f"llmrl vLLM engine / vLLM standalone, median of per-round ratios: {ratio:.2f}")
    body = (f"{args.prompts} arithmetic prompts x {args.group} samples, at most {args.max_new_tokens} new tokens, "
            f"temperature {args.temperature}, SmolLM2-135M-Instruct; tokens/s: median of {args.repeats} rounds, each "
            "running every engine once in turn after one warm-up run each (range in the next column); tokens counted "
            "up to and including EOS; weight sync s: the median time to push the policy's weights into the engine, "
            "included in its tokens/s.\n\n")
    body += markdown_table(["engine", "what", "tokens/s", "range", "s per run", "weight sync s"], rows)
    if "vLLM standalone" in rounds and "llmrl vLLM engine" in rounds:
        body += f"\n\nllmrl's vLLM engine / standalone vLLM (median of per-round ratios): {ratio:.2f}"
    print(body)
    if args.write:
        write_section("rollout_speed", "Rollout speed: HF, native, vLLM", body)


if __name__ == "__main__":
    main()
