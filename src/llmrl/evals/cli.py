"""`llmrl eval --suite NAME[,NAME...]` and `llmrl eval --compare A B`.

    llmrl eval --model smollm2-135m-instruct --suite gsm8k,humaneval,bfcl,arithmetic --limit 50
    llmrl eval --model runs/gsm8k --suite gsm8k --k 8          # a run folder: its final/ weights; pass@1/8, maj@8
    llmrl eval --compare runs/base/eval_results.json runs/gsm8k  # before/after, side by side

Results: a table on the terminal, and JSON in the run folder (`RUN/eval_results.json`), else in
`runs/evals/<model>.json`, or at `--out`. A results file gathers suites: running another suite on the same model
adds to it (the same suite is replaced). Given a run folder (or `--train-task`), each suite is also checked for
decontamination against that training task's stream (evals/decontam.py).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

RESULTS = "eval_results.json"
METRICS = ("pass@1", "pass@{k}", "maj@{k}")


def resolve_target(model: str) -> tuple[str, Path | None]:
    """(model name or path to load, the run folder or None): a run folder means its final/ checkpoint."""
    p = Path(model).expanduser()
    if p.is_dir() and (p / "final").is_dir() and (p / "config.yaml").is_file():
        return str(p / "final"), p
    return model, None


def default_out(model: str, run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir / RESULTS
    return Path("runs") / "evals" / (re.sub(r"[^\w.-]+", "_", model.strip("/")) + ".json")


def load_results(path_or_run: str) -> dict:
    p = Path(path_or_run)
    if p.is_dir():
        p = p / RESULTS
    if not p.is_file():
        raise FileNotFoundError(f"no eval results at {p}; write them with llmrl eval --model ... --suite ...")
    return json.loads(p.read_text())


def merge_write(path: Path, model: str, results: list[dict]) -> dict:
    """Add `results` to the file's suites (same model), replacing any earlier result of the same suite."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    suites = old.get("suites", {}) if old.get("model") == model else {}
    for r in results:
        suites[r["suite"]] = r
    data = {"model": model, "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "suites": suites}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return data


def _metric_names(r: dict) -> list[str]:
    return [m.format(k=r["k"]) for m in METRICS if m.format(k=r["k"]) in r and (m == "pass@1" or r["k"] > 1)]


def table(results: list[dict]) -> str:
    from llmrl.report.text import text_table as _table

    rows = [("suite", "n", "metric", "score", "mean tokens", "seconds", "top answer", "constant answer")]
    share = lambda r, k: "-" if r.get(k) is None else f"{r[k]:.3f}"  # noqa: E731  (results from before: none)
    for r in results:
        n = f"{r['n']}" + (f" of {r['of']}" if r.get("of", r["n"]) != r["n"] else "")
        for m in _metric_names(r):
            rows.append((r["suite"], n, m, f"{r[m]:.3f}", f"{r['response_length']:.1f}", f"{r['seconds']:.0f}",
                         share(r, "top_answer_share"), share(r, "constant_answer_accuracy")))
    return _table(rows)


def compare_table(a: dict, b: dict) -> str:
    from llmrl.report.text import text_table as _table

    rows = [("suite", "metric", f"A: {a['model']}", f"B: {b['model']}", "B - A")]
    for name in sorted(set(a["suites"]) | set(b["suites"])):
        ra, rb = a["suites"].get(name), b["suites"].get(name)
        for m in dict.fromkeys(_metric_names(ra or rb) + _metric_names(rb or ra)):
            va, vb = (r.get(m) if r else None for r in (ra, rb))
            fa = "-" if va is None else f"{va:.3f} (n={ra['n']})"
            fb = "-" if vb is None else f"{vb:.3f} (n={rb['n']})"
            diff = f"{vb - va:+.3f}" if va is not None and vb is not None else "-"
            rows.append((name, m, fa, fb, diff))
    return _table(rows)


def _training_examples(args, run_dir: Path | None) -> tuple[str, list] | None:
    """(task name, the first --decontam-samples examples of its training stream), from --train-task or the run."""
    import llmrl.envs  # noqa: F401  (registers the verifiers and openenv tasks)
    from llmrl.data import make_task

    name, options = args.train_task, {}
    if name is None and run_dir is not None:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        name, options = cfg["task"]["name"], cfg["task"].get("options") or {}
    if name is None:
        return None
    import itertools

    task = make_task(name, options=options)
    return name, list(itertools.islice(task.train_stream(0), args.decontam_samples))


def cmd_suites(args) -> int:
    import torch

    from llmrl.compute.settings import resolve_autocast
    from llmrl.evals import decontam
    from llmrl.evals.runner import EvalOptions, run_suite
    from llmrl.evals.suites import make_suite
    from llmrl.models import load_model

    names = [n.strip() for n in args.suite.split(",") if n.strip()]
    try:
        suites = [make_suite(n) for n in names]          # every name and every data file checked before loading
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.model is None:                               # decontamination only: no model to load
        return _decontaminate_only(args, suites)
    if args.threads:
        torch.set_num_threads(args.threads)
    path, run_dir = resolve_target(args.model)
    out = Path(args.out) if args.out else default_out(args.model, run_dir)
    train = _training_examples(args, run_dir)
    engine = _engine(args, path) if args.engine == "vllm" else None
    model, tokenizer = load_model(path)
    opts = EvalOptions(k=args.k, temperature=args.temperature, limit=args.limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template,
                       autocast_dtype=resolve_autocast(args.autocast), seed=args.seed)
    results = []
    for suite in suites:
        r = run_suite(model, tokenizer, suite, opts, engine=engine, progress=not args.no_progress)
        r["engine"] = args.engine
        if train is not None:
            r["decontamination"] = {"train_task": train[0], **decontam.report(train[1], suite.examples)}
        results.append(r)
        merge_write(out, args.model, [r])                 # written after each suite: a long run keeps its part
    print()
    print(table(results))
    for r in results:
        if r.get("decontamination"):
            _print_decontamination(r)
    print(f"results: {out}")
    return 0


def _print_decontamination(r: dict) -> None:
    d = r["decontamination"]
    print(f"decontamination {r['suite']} vs {d['train_task']} ({d['train_checked']} training questions, "
          f"{d['ngram']}-grams): {d['exact']} exact, {d['near']} near (>= {d['threshold']:.0%} overlap)")
    for e in d["examples"]:
        print(f"  {'exact' if e['exact'] else format(e['overlap'], '.0%')}: "
              f"eval {e['eval'][:90]!r} ~ train {e['train'][:90]!r}")


def _decontaminate_only(args, suites) -> int:
    from llmrl.evals import decontam

    if args.train_task is None:
        print("error: --suite needs --model (or --train-task alone, for the decontamination check only)",
              file=sys.stderr)
        return 2
    name, train = _training_examples(args, None)
    for suite in suites:
        _print_decontamination({"suite": suite.name,
                                "decontamination": {"train_task": name, **decontam.report(train, suite.examples)}})
    return 0


def _engine(args, path: str):
    from llmrl.models.loading import resolve_model_path
    from llmrl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(resolve_model_path(path), seed=args.seed)


def cmd_compare(args) -> int:
    try:
        a, b = (load_results(x) for x in args.compare)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare_table(a, b))
    return 0


def add_arguments(p) -> None:
    """The suite options of `llmrl eval` (cli.py builds the parser)."""
    p.add_argument("--suite", default=None, help="comma-separated eval suites: gsm8k, humaneval, bfcl[:category], "
                   "arithmetic, reasoning_gym:<dataset>")
    p.add_argument("--k", type=int, default=1, help="with --suite: samples per problem (1: greedy pass@1; "
                   "K > 1: pass@1, pass@K and maj@K at --temperature)")
    p.add_argument("--temperature", type=float, default=None, help="with --suite --k K: sampling temperature (1.0)")
    p.add_argument("--limit", type=int, default=None, help="with --suite: this many problems, spread over the suite")
    p.add_argument("--batch-size", type=int, default=16, help="with --suite: problems per batch")
    p.add_argument("--engine", default="native", choices=["native", "vllm"], help="with --suite: the sampler")
    p.add_argument("--out", default=None, help="with --suite: the results JSON (default: in the run folder)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="print two results files (or run folders) side by side")
    p.add_argument("--train-task", default=None, help="with --suite: check the suites for decontamination against "
                   "this task's training stream (a run folder's own task by default)")
    p.add_argument("--decontam-samples", type=int, default=10_000, help="training questions checked")
