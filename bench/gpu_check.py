"""One script that settles llmrl's GPU path: parity with the CPU, throughput, and TRL beside it where it is installed.

    PYTHONPATH=src python bench/gpu_check.py --device cuda      # on a GPU machine: ~5 minutes on one H100
    PYTHONPATH=src python bench/gpu_check.py --device cpu --smoke --doc /tmp/b.md    # seconds; what CI runs

Everything runs from random-initialised weights of known shapes, built here (no hub, no network): the tokenizer is
llmrl's character-level one with its vocabulary filled to the model's size, the prompts are the arithmetic task's.

1. Parity: a small random Llama, one GRPO step (8 prompts x 4 samples, 32 new tokens) on the CPU and on the GPU
   from the same weights and the same samples (sampled once on the CPU). Compared: pi_old, the log-probs of the
   samples before the update, and the update itself. Tolerances (bf16 autocast on both sides, different kernels):
   log-probs mean |diff| <= 0.02 and max <= 0.15 nats; the step's gradient (all weights, before clipping) by its
   cosine >= 0.99; the first AdamW step moves each weight by about lr x sign(gradient), so the updates are compared
   by their cosine over all weights (>= 0.9: sign flips of near-zero gradients lower it a little, a wrong gradient
   anywhere to ~0) and the weights after it by max |diff| <= 3 lr.
2. Throughput: GRPO steps of a SmolLM2-135M-shaped and a Qwen3-0.6B-shaped random model, 8 prompts x 16 samples,
   256 new tokens, EOS ignored so every response has 256 tokens: seconds per step by phase (one warm-up step, then
   the mean of `--steps`), rollout tokens/s against HF `generate` (sampling, the same prompts, bf16 autocast) on the
   same GPU, update MFU (6 x weights x tokens + attention, over the update phase's time) against the GPU's dense
   bf16 peak, peak GPU memory.
3. TRL's GRPOTrainer on the same shapes and settings, if `trl` and `datasets` import. They are not on the lent GPU
   machine, and they do not fit the 64 MiB the device tool carries with the tree: the cp311 wheels of trl 1.16.0,
   datasets 5.2.0 and what torch/transformers do not already bring (pyarrow 55 MB, pandas 12 MB, dill,
   multiprocess, xxhash, fsspec) come to 67 MiB (measured with `pip download --no-deps`, 2026-12-06).

It writes the `gpu-check` section of docs/benchmarks.md (`--doc` another file), with the device line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import DOC, markdown_table, write_section  # noqa: E402

# ----------------------------------------------------------------------------- shapes and settings

SHAPES = {   # the published configs' shapes (weights random)
    "smollm2-135m": dict(family="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen3-0.6b": dict(family="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "parity": dict(family="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=704, vocab_size=8192, max_position_embeddings=2048),
}
SMOKE_SHAPES = {   # the same families, tiny: --smoke
    "smollm2-135m": dict(family="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=512, max_position_embeddings=1024),
    "qwen3-0.6b": dict(family="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
                       max_position_embeddings=1024),
    "parity": dict(family="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, max_position_embeddings=1024),
}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}      # dense bf16 FLOP/s, by the device name's first match
LR = 1e-5
TOL = dict(logp_mean=0.02, logp_max=0.15, grad_cosine=0.99, update_cosine=0.9, weight_max_lr=3.0)


@dataclass
class Setting:
    prompts: int
    group: int
    new_tokens: int
    steps: int


def build_model_dir(shape: dict, out: Path, seed: int = 0) -> Path:
    """A random model of `shape` and a tokenizer of its vocabulary size, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from llmrl.models.loading import TINY_CHARS, TINY_SPECIALS, _build_tiny_tokenizer

    shape = dict(shape)
    family = shape.pop("family")
    tok = _build_tiny_tokenizer(shape["vocab_size"] - len(TINY_SPECIALS) - len(TINY_CHARS))
    tok.model_max_length = shape["max_position_embeddings"]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(**shape, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def recipe(model_dir: Path, device: str, s: Setting, out_dir: Path, extra: tuple[str, ...] = ()):
    """The GRPO recipe (k3 KL, beta 0.04, token-mean) on the model folder, run.device=`device`; micro-batches of
    at most 32 rows (~10k tokens at 256 new tokens: the activations of a 0.6B model stay well inside a GPU)."""
    from llmrl.config_loader import load_config
    from llmrl.presets import PRESETS
    from llmrl.train.build import build

    cfg = load_config(None, [
        "preset=grpo", f"model.name={model_dir}", "task.heldout_size=4", f"rollout.prompts_per_step={s.prompts}",
        f"rollout.group_size={s.group}", f"rollout.max_new_tokens={s.new_tokens}", "rollout.temperature=1.0",
        "objective.kl_coef=0.04", "objective.kl_estimator=k3", "objective.aggregation=token-mean", f"optim.lr={LR}",
        f"optim.micro_batch_size={min(32, s.prompts * s.group)}", "run.progress=false", "run.samples_every=0",
        "reward.terms=[{name: bench_digits, weight: 1.0}]", f"run.device={device}", f"run.output_dir={out_dir}",
        f"run.name=gpu_check_{device.replace(':', '')}", *extra], presets=PRESETS)
    return build(cfg)


def register_reward() -> None:
    """A reward that varies with the text (the share of digits), so random models get non-zero advantages."""
    from llmrl.rewards import REWARDS

    if "bench_digits" not in REWARDS.names():
        REWARDS.register("bench_digits")(
            lambda completions, examples, **_: [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions])


def ignore_eos() -> None:
    """Responses run to max_new_tokens (fixed lengths): the collectors see no stop id."""
    import llmrl.rollout.collect as collect

    collect.stop_ids = lambda tokenizer: ()


class Recorder:
    """Wraps a recipe's collector: keeps the last rollout (the FLOP count reads it), or replays a fixed one."""

    def __init__(self, collect, fixed=None):
        self.collect, self.fixed, self.last = collect, fixed, None

    def __call__(self, model, *args, **kw):
        self.last = (self.fixed.to(next(model.parameters()).device) if self.fixed is not None
                     else self.collect(model, *args, **kw))
        return self.last


def record_gradients(model) -> dict:
    """{name: the parameter's gradient, on the host} as the backward leaves it (the optimizer frees it after)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.detach().cpu()))
    return grads


def cosine(a: list, b: list) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.cat(a).double(), torch.cat(b).double(), dim=0))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. parity


def parity(model_dir: Path, device: str, s: Setting, out_dir: Path) -> dict:
    """One GRPO step on the CPU and on `device` from the same weights and samples; the differences."""
    from llmrl.compute.batches import batched_logprobs
    from llmrl.train.rl import rl_step

    cpu = recipe(model_dir, "cpu", s, out_dir)
    other = recipe(model_dir, device, s, out_dir)
    prompts = next(cpu.batches)
    next(other.batches)
    cpu.collect = Recorder(cpu.collect)
    fixed = cpu.collect(cpu.model, cpu.tokenizer, prompts, group_size=s.group, max_new_tokens=s.new_tokens,
                        temperature=1.0, autocast_dtype=cpu.ex.autocast_dtype, generator=cpu.generator)
    cpu.collect, other.collect = Recorder(None, fixed), Recorder(None, fixed)
    before = {k: v.detach().clone() for k, v in cpu.model.state_dict().items()}
    lp_cpu = batched_logprobs(cpu.model, fixed, cpu.ex)
    lp_dev = batched_logprobs(other.model, fixed.to(other.ex.device), other.ex).cpu()
    g_cpu, g_dev = record_gradients(cpu.model), record_gradients(other.model)
    rl_step(cpu, prompts, 1)
    rl_step(other, prompts, 1)
    mask = fixed.response_mask.bool()
    diff = (lp_cpu - lp_dev).abs()[mask]
    after_dev = {k: v.cpu() for k, v in other.model.state_dict().items()}
    d_cpu, d_dev, w_max = [], [], 0.0
    for name, w in cpu.model.state_dict().items():
        d_cpu.append((w - before[name]).flatten().float())
        d_dev.append((after_dev[name] - before[name]).flatten().float())
        w_max = max(w_max, float((w - after_dev[name]).abs().max()))
    names = sorted(g_cpu)
    out = {"logp_mean": float(diff.mean()), "logp_max": float(diff.max()),
           "grad_cosine": cosine([g_cpu[k].flatten() for k in names], [g_dev[k].flatten() for k in names]),
           "update_cosine": cosine(d_cpu, d_dev), "weight_max_lr": w_max / LR,
           "moved": float(torch.cat(d_cpu).abs().max()) > 0 and len(g_cpu) == len(g_dev) > 0}
    out["ok"] = (out["moved"] and out["logp_mean"] <= TOL["logp_mean"] and out["logp_max"] <= TOL["logp_max"]
                 and out["grad_cosine"] >= TOL["grad_cosine"] and out["update_cosine"] >= TOL["update_cosine"]
                 and out["weight_max_lr"] <= TOL["weight_max_lr"])
    return out


def sampler_contract(model_dir: Path, device: str, new_tokens: int = 32) -> dict:
    """The native sampler on `device` (fp32, its own decode loop: the CUDA graphs on a GPU): greedy rows against
    HF `generate` one prompt at a time, and sampled rows' recorded log-probs against one full forward."""
    from llmrl.data import make_task
    from llmrl.models import load_model
    from llmrl.rollout.collect import encode_prompt
    from llmrl.rollout.sampler import generate

    model, tok = load_model(str(model_dir), dtype=torch.float32)
    model = model.to(device).eval()
    prompts = [encode_prompt(tok, ex.prompt) for ex, _ in zip(make_task("arithmetic", seed=1).train_stream(1), range(4))]
    greedy = generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0, pad_id=tok.pad_token_id)
    same = 0
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                             max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)    # EOS ignored, as here
        same += out[0, len(p):].tolist() == greedy.response_ids[i].tolist()
    s = generate(model, prompts, group_size=4, max_new_tokens=new_tokens, temperature=1.0, pad_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    ids, mask = torch.cat([s.prompt_ids, s.response_ids], 1), torch.cat([s.prompt_mask, s.response_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    full = torch.log_softmax(logits[:, -new_tokens - 1:-1].float(), -1).gather(-1, s.response_ids[..., None])[..., 0]
    return {"greedy_equal_hf": f"{same}/{len(prompts)}", "logp_max": float((s.logp - full).abs().max()),
            "ok": same == len(prompts) and float((s.logp - full).abs().max()) <= 1e-3}


# ----------------------------------------------------------------------------- 2. throughput


def update_flops(model, rollout) -> float:
    """6 x (decoder linear weights x tokens + head x response tokens) + causal attention, forward and backward."""
    cfg = model.config
    layers = model.get_decoder().layers
    p_layers = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    p_head = model.get_output_embeddings().weight.numel()
    n = rollout.attention_mask.sum(-1).double()
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return float(6 * (p_layers * rollout.attention_mask.sum() + p_head * rollout.response_mask.sum())
                 + 6 * len(layers) * d_attn * (n * (n + 1)).sum())


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def hf_generate_tokens_per_s(r, prompts: list, s: Setting) -> float:
    """HF `generate` sampling the same prompts (G each, exactly `new_tokens` each) under bf16 autocast."""
    from llmrl.rollout.collect import encode_prompt
    from llmrl.rollout.sampler import left_pad

    ids, mask = left_pad([encode_prompt(r.tokenizer, ex.prompt) for ex in prompts], r.tokenizer.pad_token_id)
    ids, mask = ids.to(r.ex.device), mask.to(r.ex.device)
    model, was_training = r.model, r.model.training
    model.eval()
    model.config.use_cache = True
    sync(str(r.ex.device))
    t = time.perf_counter()
    with torch.no_grad(), r.ex.autocast():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=s.group, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                             pad_token_id=r.tokenizer.pad_token_id)
    sync(str(r.ex.device))
    seconds = time.perf_counter() - t
    model.config.use_cache = False
    model.train(was_training)
    return (out.shape[1] - ids.shape[1]) * out.shape[0] / seconds


def throughput(model_dir: Path, device: str, s: Setting, out_dir: Path) -> dict:
    """`s.steps` timed GRPO steps after a warm-up: phases, tokens/s against HF generate, MFU, peak memory."""
    from llmrl.train.rl import rl_step

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    r = recipe(model_dir, device, s, out_dir)
    r.collect = Recorder(r.collect)
    recs, flops = [], []
    for step in range(s.steps + 1):
        prompts = next(r.batches)
        sync(device)
        rec = rl_step(r, prompts, step + 1)
        sync(device)
        if step:                                    # step 0 warms up (kernels, graphs, allocator)
            recs.append(rec)
            flops.append(update_flops(r.model, r.collect.last))
    mean = lambda k: statistics.mean(x[k] for x in recs)  # noqa: E731
    out = {k: mean(k) for k in ("time_rollout", "time_reward", "time_ref_values", "time_update", "time_step",
                                "tokens_per_s")}
    out["response_tokens"] = mean("response_length")
    out["hf_generate_tokens_per_s"] = hf_generate_tokens_per_s(r, prompts, s)
    peak = peak_flops(device)
    achieved = statistics.mean(flops) / out["time_update"]
    out["update_tflops"] = achieved / 1e12
    out["mfu"] = achieved / peak if peak else None
    out["peak_memory_gib"] = (torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
                              if device.startswith("cuda") else None)
    return out


# ----------------------------------------------------------------------------- 3. TRL beside it


def trl_step_seconds(model_dir: Path, device: str, s: Setting, out_dir: Path) -> float | str:
    """Seconds per GRPOTrainer step on the same shape and settings (bf16, EOS ignored), or why it did not run."""
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        return f"not run: {e.name or e} is not installed"
    from llmrl.data import make_task

    task = make_task("arithmetic", seed=0)
    examples = [ex for ex, _ in zip(task.train_stream(0), range(s.prompts * (s.steps + 1)))]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}]} for ex in examples])
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

    def digits(completions, **_):
        return [sum(ch.isdigit() for ch in c[0]["content"]) / max(1, len(c[0]["content"])) for c in completions]

    args = GRPOConfig(output_dir=str(out_dir / "trl"), per_device_train_batch_size=s.prompts * s.group,
                      num_generations=s.group, max_completion_length=s.new_tokens, temperature=1.0, beta=0.04,
                      learning_rate=LR, max_steps=s.steps + 1, logging_steps=1, save_strategy="no", report_to=[],
                      bf16=device.startswith("cuda"), use_cpu=not device.startswith("cuda"), disable_tqdm=True,
                      generation_kwargs={"min_new_tokens": s.new_tokens})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=digits, args=args,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          callbacks=[Clock()])
    trainer.train()
    return statistics.mean(times[1:]) if len(times) > 1 else times[0]


# ----------------------------------------------------------------------------- the report


def device_line(device: str) -> str:
    if not device.startswith("cuda"):
        return f"CPU (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    p = torch.cuda.get_device_properties(torch.device(device))
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}, "
            f"dense bf16 peak taken as {peak_flops(device) / 1e12:.0f} TFLOP/s" if peak_flops(device) else
            f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")


def report(device: str, par: dict, runs: dict, trl: dict, s: Setting) -> str:
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"Device: {device_line(device)}", "",
             f"Parity (CPU against {device}, one GRPO step of a random Llama from the same weights and samples; "
             f"bf16 autocast both sides): log-probs mean |diff| {par['logp_mean']:.4f} (<= {TOL['logp_mean']}), "
             f"max {par['logp_max']:.4f} (<= {TOL['logp_max']}); gradient cosine {par['grad_cosine']:.5f} "
             f"(>= {TOL['grad_cosine']}); update cosine {par['update_cosine']:.4f} "
             f"(>= {TOL['update_cosine']}); weights after it max |diff| {par['weight_max_lr']:.2f} lr "
             f"(<= {TOL['weight_max_lr']}): **{'within tolerance' if par['ok'] else 'OUT OF TOLERANCE'}**.", "",
             f"Sampler contract on {device} (fp32, the device's decode loop): greedy rows equal to HF generate "
             f"{par['sampler']['greedy_equal_hf']}; recorded log-probs against a full forward max |diff| "
             f"{par['sampler']['logp_max']:.2e} (<= 1e-3): **{'holds' if par['sampler']['ok'] else 'BROKEN'}**.", "",
             f"Throughput: GRPO, {s.prompts} prompts x {s.group} samples, {s.new_tokens} new tokens (EOS ignored), "
             f"random weights; mean of {s.steps} steps after one warm-up.", ""]
    header = ["shape", "step s", "rollout s", "reward s", "ref s", "update s", "rollout tok/s", "HF generate tok/s",
              "x HF", "update TFLOP/s", "MFU", "peak GiB", "TRL step s"]
    rows = []
    for name, o in runs.items():
        t = trl.get(name)
        rows.append([name, fmt(o["time_step"]), fmt(o["time_rollout"]), fmt(o["time_reward"]),
                     fmt(o["time_ref_values"]), fmt(o["time_update"]), fmt(o["tokens_per_s"], "{:.0f}"),
                     fmt(o["hf_generate_tokens_per_s"], "{:.0f}"),
                     fmt(o["tokens_per_s"] / o["hf_generate_tokens_per_s"], "{:.2f}"), fmt(o["update_tflops"], "{:.1f}"),
                     fmt(o["mfu"], "{:.1%}"), fmt(o["peak_memory_gib"], "{:.1f}"),
                     fmt(t, "{:.2f}") if isinstance(t, float) else (t or "-")])
    return "\n".join(lines) + "\n" + markdown_table(header, rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and batches: the CPU run CI makes")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per shape (default 3; 1 with --smoke)")
    ap.add_argument("--shapes", nargs="*", default=["smollm2-135m", "qwen3-0.6b"])
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even where it imports")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file whose gpu-check section is rewritten")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    par_s = Setting(2, 2, 8, 1) if args.smoke else Setting(8, 4, 32, 1)
    run_s = Setting(2, 2, 8, args.steps or 1) if args.smoke else Setting(8, 16, 256, args.steps or 3)
    register_reward()
    ignore_eos()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {name: build_model_dir(shapes[name], tmp / name) for name in ["parity", *args.shapes]}
        par = parity(dirs["parity"], args.device, par_s, tmp / "runs")
        par["sampler"] = sampler_contract(dirs["parity"], args.device, new_tokens=par_s.new_tokens)
        print("parity", json.dumps(par), flush=True)
        runs, trl = {}, {}
        for name in args.shapes:
            runs[name] = throughput(dirs[name], args.device, run_s, tmp / "runs")
            print(name, json.dumps(runs[name]), flush=True)
            if not args.no_trl:
                try:
                    trl[name] = trl_step_seconds(dirs[name], args.device, run_s, tmp / "runs")
                except Exception as e:          # TRL's own failure is a result to report, not the check's
                    trl[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                print(name, "trl", trl[name], flush=True)
    body = report(args.device, par, runs, trl, run_s) + f"\n\nWall time of the whole check: {time.perf_counter() - t0:.0f} s."
    write_section("gpu-check", "GPU check: parity, throughput, TRL (bench/gpu_check.py)", body, doc=args.doc)
    result = {"device": device_line(args.device), "parity": par, "throughput": runs, "trl": trl}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(body)
    return result


if __name__ == "__main__":
    main()
