"""Which allocations grow the heap: every allocation of 1 MiB or more in a real GRPO run, and whether it moved the
program break (glibc's heap top), phase by phase.

A probe for the open question of compute/heap.py (peak RSS that depends on the heap's history). It compiles a small
malloc interposer with the system C compiler, runs `llmrl.train.rl.train` on bench/compare_trl.py's settings under
it (LD_PRELOAD; glibc only), marks the phases (rollout, reference forward, update, optimizer step) in the log, and
prints, for each phase where the heap grew: the allocations that grew it (size, MiB of growth, MiB of large
allocations live at that moment). `--phase 9:update` also prints the large allocations live at that phase's peak,
grouped by the phase they were made in.

    python bench/heap_trace.py --steps 16
    python bench/heap_trace.py --steps 16 --phase 9:update

Prints only (no section in docs/benchmarks.md). Needs `cc` and glibc; the log is left in the temporary directory
it names.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static void *(*r_malloc)(size_t); static void (*r_free)(void *); static void *(*r_calloc)(size_t, size_t);
static void *(*r_realloc)(void *, size_t); static int (*r_pm)(void **, size_t, size_t);
static int fd = -1; static __thread int busy = 0;
#define MIN (1 << 20)
#define TAB (1 << 16)
static uintptr_t keys[TAB]; static size_t vals[TAB];             /* live large blocks: pointer -> size */
static void put(uintptr_t p, size_t s) {                        /* open addressing; 1 marks a removed key */
  size_t h = (p >> 6) & (TAB - 1);
  while (keys[h] > 1 && keys[h] != p) h = (h + 1) & (TAB - 1);
  keys[h] = p; vals[h] = s;
}
static size_t take(uintptr_t p) {                               /* the block's size, 0 if not a large block */
  for (size_t h = (p >> 6) & (TAB - 1); keys[h]; h = (h + 1) & (TAB - 1))
    if (keys[h] == p) { keys[h] = 1; return vals[h]; }
  return 0;
}
static char boot[1 << 16]; static size_t bootn = 0;              /* dlsym's own allocations, before init */
static void init(void) {
  if (r_malloc) return;
  r_malloc = dlsym(RTLD_NEXT, "malloc"); r_free = dlsym(RTLD_NEXT, "free"); r_calloc = dlsym(RTLD_NEXT, "calloc");
  r_realloc = dlsym(RTLD_NEXT, "realloc"); r_pm = dlsym(RTLD_NEXT, "posix_memalign");
  const char *f = getenv("HEAP_TRACE_LOG"); if (f) fd = open(f, O_WRONLY | O_CREAT | O_APPEND, 0644);
}
static void logit(char op, void *p, size_t s, long grew) {
  if (fd < 0) return;
  char b[96];
  int n = snprintf(b, sizeof b, "%c %lx %zu %ld\n", op, (unsigned long)(uintptr_t)p, s, grew);
  write(fd, b, n);
}
#define TRACED(call, size, ptr) busy = 1; uintptr_t b0 = (uintptr_t)sbrk(0); call; \
  if (ptr) { put((uintptr_t)(ptr), size); logit('A', ptr, size, (long)((uintptr_t)sbrk(0) - b0)); } busy = 0;
void *malloc(size_t s) {
  if (!r_malloc) {
    if (busy) { void *p = boot + bootn; bootn += (s + 15) & ~15; return p; }
    busy = 1; init(); busy = 0;
  }
  if (s < MIN || busy) return r_malloc(s);
  void *p; TRACED(p = r_malloc(s), s, p) return p;
}
void *calloc(size_t n, size_t s) {
  if (!r_calloc) { void *p = boot + bootn; bootn += (n * s + 15) & ~15; memset(p, 0, n * s); return p; }
  if (n * s < MIN || busy) return r_calloc(n, s);
  void *p; TRACED(p = r_calloc(n, s), n * s, p) return p;
}
void free(void *p) {
  if ((char *)p >= boot && (char *)p < boot + sizeof boot) return;
  if (!r_free) init();
  if (p && !busy) { busy = 1; size_t s = take((uintptr_t)p); if (s) logit('F', p, s, 0); busy = 0; }
  r_free(p);
}
void *realloc(void *p, size_t s) {
  if (!r_realloc) init();
  if (p && !busy) { busy = 1; size_t o = take((uintptr_t)p); if (o) logit('F', p, o, 0); busy = 0; }
  if (s < MIN || busy) return r_realloc(p, s);
  void *q; TRACED(q = r_realloc(p, s), s, q) return q;
}
int posix_memalign(void **pp, size_t a, size_t s) {
  if (!r_pm) init();
  if (s < MIN || busy) return r_pm(pp, a, s);
  int r; TRACED(r = r_pm(pp, a, s), s, (r ? NULL : *pp)) return r;
}
"""


def run_traced(steps: int, log: Path, overrides: list[str]) -> None:
    """In the traced child: the GRPO run with phase marks written into the log."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llmrl.train.build as build
    import llmrl.train.rl as rl
    import llmrl.train.rules as rules
    import llmrl.train.stages as stages
    from compare_trl import config

    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    step = [0]

    def mark(s: str) -> None:
        os.write(fd, f"M {s}\n".encode())

    def wrap(name, fn):
        def w(*a, **k):
            mark(f"{step[0]}:{name}")
            try:
                return fn(*a, **k)
            finally:
                mark(f"{step[0]}:after_{name}")
        return w

    collector = build.make_collector

    def rollout_collector(*a, **k):
        collect = wrap("rollout", collector(*a, **k))

        def counted(*a2, **k2):
            step[0] += 1
            return collect(*a2, **k2)
        return counted

    build.make_collector = rollout_collector
    stages.batched_logprobs = wrap("reference", stages.batched_logprobs)
    rules.policy_update = wrap("update", rules.policy_update)
    optim = importlib.import_module("torch.optim.optimizer")
    optim.register_optimizer_step_pre_hook(lambda *_: mark(f"{step[0]}:optimizer_step"))
    optim.register_optimizer_step_post_hook(lambda *_: mark(f"{step[0]}:after_optimizer_step"))
    rl.train(config(steps, "llmrl_bf16", f"run.output_dir={tempfile.mkdtemp()}", *overrides))


def analyse(log: Path, peak_phase: str | None) -> None:
    phase, live, born = "start-up", {}, {}
    grew: dict[str, list] = collections.defaultdict(list)
    best = (0, {})
    for line in log.read_text().splitlines():
        kind, *rest = line.split()
        if kind == "M":
            phase = rest[0]
            continue
        ptr, size = int(rest[0], 16), int(rest[1])
        if kind == "A":
            live[ptr], born[ptr] = size, phase
            if int(rest[2]) > 0:
                grew[phase].append((size >> 20, int(rest[2]) >> 20, sum(live.values()) >> 20))
        else:
            live.pop(ptr, None)
        if phase == peak_phase and sum(live.values()) > best[0]:
            best = (sum(live.values()), {p: (born[p], s) for p, s in live.items()})
    print("heap growth by phase (MiB); each event: (allocation MiB, growth MiB, large allocations live MiB)")
    for ph, events in grew.items():
        print(f"  {ph:24s} +{sum(e[1] for e in events):5d}  {events[:8]}{' ...' if len(events) > 8 else ''}")
    if peak_phase:
        total, blocks = best
        print(f"large allocations live at the peak of {peak_phase}: {total >> 20} MiB")
        by = collections.Counter()
        for ph, size in blocks.values():
            by[(ph, size >> 20)] += 1
        for (ph, mib), n in sorted(by.items(), key=lambda kv: -kv[0][1] * kv[1]):
            print(f"  made in {ph:24s} {mib:5d} MiB x {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--phase", help="also list the large allocations live at this phase's peak, e.g. 9:update")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides")
    args = ap.parse_args()
    if args.child:
        return run_traced(args.steps, Path(args.child), args.overrides)
    work = Path(tempfile.mkdtemp(prefix="heap_trace_"))
    (work / "shim.c").write_text(SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", work / "shim.so", work / "shim.c", "-ldl"], check=True)
    log = work / "trace.log"
    log.touch()
    env = {**os.environ, "LD_PRELOAD": str(work / "shim.so"), "HEAP_TRACE_LOG": str(log)}
    subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(log), *args.overrides],
                   env=env, check=True)
    print(f"log: {log}")
    analyse(log, args.phase)


if __name__ == "__main__":
    main()
