"""Write the eval table section of docs/benchmarks.md from the results files bench/eval_table.sh leaves.

    python bench/eval_table_doc.py                       # runs/eval_table/base*.json (main_arithmetic*, gsm8k_run*)
    python bench/eval_table_doc.py --note "..."          # a line about how the run went (load, what was cut)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_section  # noqa: E402

SUITES = ("gsm8k", "humaneval", "bfcl", "arithmetic")


def gather(folder: Path, prefix: str) -> dict:
    """Every suite result in folder/prefix*.json, by suite name."""
    out = {}
    for f in sorted(folder.glob(f"{prefix}*.json")):
        out.update(json.loads(f.read_text())["suites"])
    return out


def cell(r: dict | None) -> str:
    if r is None:
        return "—"
    n = f"{r['n']}" + (f" of {r['of']}" if r["of"] != r["n"] else "")
    return f"{r['pass@1']:.3f} (n={n}, {r['response_length']:.0f} tokens, {r['seconds']:.0f} s)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="runs/eval_table")
    p.add_argument("--note", default="")
    args = p.parse_args()
    folder = Path(args.dir)
    columns = {"SmolLM2-135M-Instruct": gather(folder, "base"),
               "after the main job (examples/main_arithmetic.yaml)": gather(folder, "main_arithmetic"),
               "after a GSM8K run (examples/gsm8k.yaml)": gather(folder, "gsm8k_run")}
    columns = {k: v for k, v in columns.items() if v}
    base = columns["SmolLM2-135M-Instruct"]
    rows = [[s, *(cell(c.get(s)) for c in columns.values())] for s in SUITES]
    table = markdown_table(["suite (greedy pass@1)", *columns], rows)
    cmds = "\n".join(f"    llmrl eval --model smollm2-135m-instruct --suite {s} --limit {base[s]['n']}"
                     for s in SUITES if s in base and base[s]["n"] != base[s]["of"])
    body = (f"{table}\n\nPartial sets, spread evenly over each suite (`--limit N` takes every len/N-th problem): "
            f"the numbers are estimates on n problems, not the published full-set scores. The commands run "
            f"(bench/eval_table.sh):\n\n{cmds}\n\nThe full sets: `FULL=1 bash bench/eval_table.sh`, or "
            f"`llmrl eval --model smollm2-135m-instruct --suite gsm8k,humaneval,bfcl,arithmetic`.\n\n{args.note}")
    print(body)
    write_section("eval_table", "Standard evaluations: SmolLM2-135M-Instruct", body)


if __name__ == "__main__":
    main()
