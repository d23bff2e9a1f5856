"""bench/gpu_check.py runs end to end on the CPU (--smoke): parity, both shapes' steps, its doc section."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_on_cpu(tmp_path):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "check.json"
    doc.write_text("# Benchmarks\n\n<!-- gpu-check:start -->\nOLD-FIGURES\n<!-- gpu-check:history -->\nkept\n<!-- gpu-check:end -->\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--no-trl", "--doc", str(doc), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "LLMRL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    par = result["parity"]
    assert par["ok"] and par["moved"] and par["logp_max"] == 0.0      # the CPU against itself: the same numbers
    assert par["sampler"]["ok"] and par["sampler"]["greedy_equal_hf"] == "4/4"
    for shape in ("smollm2-135m", "qwen3-0.6b"):
        run = result["throughput"][shape]
        assert run["response_tokens"] == 8.0                             # EOS ignored: every response is full
        assert run["time_step"] >= run["time_rollout"] > 0 and run["update_tflops"] > 0
        assert run["hf_generate_tokens_per_s"] > 0 and run["mfu"] is None   # no bf16 peak known for a CPU
    text = doc.read_text()
    assert "Device: CPU" in text and "within tolerance" in text and "**holds**" in text and "| qwen3-0.6b |" in text
    assert "OLD-FIGURES" not in text and "kept" in text and text.count("gpu-check:start") == 1
