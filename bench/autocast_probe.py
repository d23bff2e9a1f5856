"""What `model.autocast: auto` decides on this machine, and why: bf16 against fp32 on the same CPU, in one run.

bf16 autocast is fast only where the CPU multiplies bf16 natively (AVX-512 BF16, AMX); elsewhere oneDNN emulates
it. The probe times, under each compute dtype, (a) one matmul of SmolLM2-135M's MLP shape ([512, 576] x [576, 1536])
and (b) a no-grad forward of the bundled model over a [8, 32]-token batch, with the same threads, and writes the
ratios to docs/benchmarks.md (section "autocast_probe") beside what `native_bf16` answered.

    python bench/autocast_probe.py                 # about a minute with native bf16, a few without
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import markdown_table, timed, write_section  # noqa: E402

from llmrl.compute.settings import native_bf16, resolve_autocast  # noqa: E402
from llmrl.models import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--doc", default=None, help="write to this copy of docs/benchmarks.md instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 576, generator=g), torch.randn(576, 1536, generator=g)
    model, _ = load_model("smollm2-135m-instruct")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=g)
    rows = []
    seconds = {}
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        amp = lambda: torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)  # noqa: E731

        def matmul():
            with amp():
                a @ b

        def forward():
            with torch.no_grad(), amp():
                model(input_ids=ids)

        seconds[name] = (timed(matmul, args.reps * 5)[0], timed(forward, args.reps)[0])
        rows.append([name, f"{seconds[name][0] * 1e3:.2f}", f"{seconds[name][1]:.3f}"])
    ratio_mm = seconds["bf16 autocast"][0] / seconds["fp32"][0]
    ratio_fw = seconds["bf16 autocast"][1] / seconds["fp32"][1]
    rows.append(["bf16 / fp32", f"{ratio_mm:.2f}x", f"{ratio_fw:.2f}x"])
    picked = resolve_autocast("auto")
    body = (f"One matmul of SmolLM2-135M's MLP shape ([512, 576] x [576, 1536], median of {args.reps * 5}) and a "
            f"no-grad forward of SmolLM2-135M-Instruct over [8, 32] tokens (median of {args.reps}), {args.threads} "
            f"threads, fp32 weights, with autocast off and in bf16.\n\n"
            + markdown_table(["compute dtype", "matmul ms", "forward s"], rows)
            + f"\n\n`native_bf16('cpu')` = {native_bf16('cpu')}: `model.autocast: auto` (the default) picks "
            f"{'bf16' if picked is not None else 'fp32 (autocast off)'} on this machine.\n")
    print(body)
    kw = {"doc": Path(args.doc)} if args.doc else {}
    write_section("autocast_probe", "bf16 or fp32: what model.autocast=auto picks, and why", body, **kw)


if __name__ == "__main__":
    main()
