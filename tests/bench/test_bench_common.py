"""bench/common.py's section writer: a rerun replaces its figures and keeps the hand-written history."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import machine, write_section  # noqa: E402


def test_write_section_replaces_figures_and_keeps_history(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- a:start -->\n## A\n\nold figures\n\n<!-- a:history -->\nrun 1 notes\n"
                   "<!-- a:end -->\n\n<!-- b:start -->\n## B\n\nother\n<!-- b:end -->\n")
    write_section("a", "A", "new figures", doc)
    text = doc.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.index("new figures") < text.index("<!-- a:history -->\nrun 1 notes\n<!-- a:end -->")
    assert "<!-- b:start -->\n## B\n\nother\n<!-- b:end -->" in text
    write_section("a", "A", "newer figures", doc)           # a second rerun keeps the history exactly once
    text = doc.read_text()
    assert text.count("run 1 notes") == 1 and "new figures" not in text and "newer figures" in text


def test_write_section_appends_a_new_section_without_history(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    write_section("c", "C", "figures", doc)
    text = doc.read_text()
    assert text.rstrip().endswith("figures\n<!-- c:end -->") and "history" not in text


def test_machine_line_names_family_and_bf16_unit(tmp_path):
    zen5 = tmp_path / "zen5"
    zen5.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC\n"
                    "flags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 99\n")
    xeon = tmp_path / "xeon"
    xeon.write_text("cpu family\t: 6\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx512_bf16 amx_bf16\n")
    assert machine(zen5).startswith("AMD EPYC (cpu family 26, AVX-512 BF16), ")
    assert machine(xeon).startswith("Intel(R) Xeon(R) Processor (cpu family 6, AMX bf16), ")
    assert machine(tmp_path / "absent").startswith("unknown CPU (no bf16 matmul unit), ")
