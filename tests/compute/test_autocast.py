"""compute/settings.py's autocast choice: `model.autocast: auto` is bf16 only where the device multiplies bf16
natively (a CPU without AVX-512 BF16 or AMX emulates it, many times slower: bench/autocast_probe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmrl.compute import settings
from llmrl.compute.settings import Execution, native_bf16, resolve_autocast
from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.presets import PRESETS


@pytest.mark.parametrize("native", [True, False])
def test_autocast_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(settings, "native_bf16", lambda kind: native)
    assert resolve_autocast("auto") == (torch.bfloat16 if native else None)
    assert resolve_autocast("bfloat16") == torch.bfloat16 and resolve_autocast("none") is None   # as asked
    cfg = load_config(None, ["run.device=cpu"], presets=PRESETS)
    assert cfg.model.autocast == "auto"                                                        # the default
    assert Execution.from_config(cfg).autocast_dtype == (torch.bfloat16 if native else None)
    forced = load_config(None, ["run.device=cpu", "model.autocast=bfloat16"], presets=PRESETS)
    assert Execution.from_config(forced).autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autocast must be one of auto, bfloat16, none"):
        resolve_autocast("fp16")
    with pytest.raises(ConfigError, match="model.autocast"):
        load_config(None, ["model.autocast=fp16"], presets=PRESETS)


def test_the_cpu_bf16_probe_agrees_with_the_cpu_flags():
    """oneDNN's own answer against the instructions it needs (AVX-512 BF16 or AMX bf16); a CUDA-less or non-GPU
    device is never native."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert not native_bf16("mps")
    if not torch.cuda.is_available():
        assert not native_bf16("cuda")
