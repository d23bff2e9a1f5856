"""How the forwards of an RL step run: one small settings object instead of the same six arguments threaded by
hand through every log-prob, value and update call, and the one place where the device picks the machinery.

    ex = Execution.from_config(cfg)
    with ex.autocast():
        logp, entropy = response_logprobs(model, ids, mask, T, temperature=ex.temperature, pack_tokens=ex.pack_tokens,
                                          chunk=ex.head_chunk)

`run.device` (auto | cpu | cuda | cuda:N) becomes `Execution.device` through `resolve_device`; everything a step
allocates lives there. What differs by device (`DEVICE_CHOICES`):

| device | packed attention (packing.py)          | LM head chunk | decode loop (rollout/sampler.py)              | host heap |
|--------|----------------------------------------|---------------|-----------------------------------------------|-----------|
| cpu    | segment blocks (attention.py)          | 128 tokens    | lean decoder + C kernels, oneDNN pre-packing, | retained  |
|        |                                        |               | rows compacted as they stop                   | (heap.py) |
| cuda   | SDPA with the packs' block mask        | 1024 tokens   | static KV cache, one CUDA graph per step      | as is     |
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoices:
    segment_attention: bool     # shared-prompt packs through attention.py's blocks (else SDPA with a block mask)
    head_chunk: int             # response tokens per chunk of the LM head (compute/logprobs.py)
    decoder: str                # the sampler's decode loop: "lean" (C kernels, compaction) | "static" (CUDA graphs)
    retain_heap: bool           # keep freed host memory in the heap (compute/heap.py): the tensors are host tensors


DEVICE_CHOICES = {
    "cpu": DeviceChoices(segment_attention=True, head_chunk=128, decoder="lean", retain_heap=True),
    "cuda": DeviceChoices(segment_attention=False, head_chunk=1024, decoder="static", retain_heap=False),
}


def choices(device: torch.device | str) -> DeviceChoices:
    """The machinery for `device`'s type (an unknown type gets the CUDA choices: none of them is CPU-only)."""
    return DEVICE_CHOICES.get(torch.device(device).type, DEVICE_CHOICES["cuda"])


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """`run.device` -> a torch device. auto: CUDA when a GPU is visible, else the CPU. Under torchrun
    (`local_rank`, default the LOCAL_RANK variable when WORLD_SIZE > 1) "cuda" and "auto" mean this process's GPU,
    cuda:LOCAL_RANK. A CUDA device that is not there is an error, not a silent fall-back to the CPU."""
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not (spec == "cuda" or spec.startswith("cuda:") and spec[5:].isdigit()):
        raise ValueError(f"run.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"run.device={spec} but CUDA is not available ({why}; torch {torch.__version__}): "
                         "use run.device=cpu or auto")
    if spec == "cuda":
        index = local_rank or 0
    elif local_rank:
        raise ValueError(f"run.device={spec} under torchrun would put every rank on one GPU: use run.device=cuda "
                         "(each rank takes cuda:LOCAL_RANK)")
    else:
        index = int(spec[5:])
    if index >= torch.cuda.device_count():
        raise ValueError(f"run.device: GPU {index} asked for, {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bf16 matmuls natively: a CUDA GPU with bf16; a CPU whose oneDNN has bf16
    kernels (AVX-512 BF16 or AMX: `torch.ops.mkldnn._is_mkldnn_bf16_supported`, or else the CPU flags). Without
    them oneDNN emulates bf16: on an AVX2-only AMD EPYC Zen 3 a matmul of SmolLM2's MLP shape took 134x, a model
    forward 7.3x as long as in fp32 (bench/autocast_probe.py)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a torch without the probe: read the flags (Linux)
        try:
            flags = open("/proc/cpuinfo").read().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


AUTOCAST_SETTINGS = ("auto", "bfloat16", "none")


def resolve_autocast(setting: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """`model.autocast` (or `--autocast`) -> the matmuls' dtype under autocast, None for the weights' own.
    auto: bf16 where `device` computes it natively (`native_bf16`), else None (fp32 on fp32 weights)."""
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        kind = torch.device(device).type
        if native_bf16(kind):
            return torch.bfloat16
        _note_fp32(kind)
        return None
    return torch.bfloat16 if setting == "bfloat16" else None


@functools.cache
def _note_fp32(kind: str) -> None:
    log.info("autocast auto: this %s has no native bf16 matmul, so forwards run in fp32 (model.autocast=bfloat16 "
             "forces bf16, emulated and much slower here)", kind)


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded from `generator` (one draw from it), or `generator` itself when it is
    already there. The recipe's generator stays on the CPU (its state is checkpointed); draws on a GPU need one
    of the GPU's own."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Execution:
    device: torch.device = torch.device("cpu")   # where the models, the rollout's tensors and the math live
    autocast_dtype: torch.dtype | None = None    # the matmuls' dtype under autocast (None: the weights' own)
    pack_tokens: int | None = None               # padding-free forwards in packs of at most this many tokens
    micro_batch_size: int = 32                   # rows per forward/backward
    micro_batch_tokens: int | None = None        # at most this many (padded) tokens per forward/backward
    temperature: float = 1.0                     # the sampling temperature the log-probs are taken at
    max_len: int | None = None                   # the response budget (the constant of length-normalised losses)

    @classmethod
    def from_config(cls, cfg) -> "Execution":
        """The settings a `TrainConfig` chooses (the device through `resolve_device`)."""
        return cls(
            device=resolve_device(getattr(cfg.run, "device", "cpu")),
            autocast_dtype=resolve_autocast(cfg.model.autocast, resolve_device(getattr(cfg.run, "device", "cpu"))),
            pack_tokens=cfg.optim.pack_tokens if cfg.optim.packing else None,
            micro_batch_size=cfg.optim.micro_batch_size, micro_batch_tokens=cfg.optim.micro_batch_tokens,
            temperature=cfg.rollout.temperature or 1.0, max_len=cfg.rollout.max_new_tokens)

    @property
    def head_chunk(self) -> int:
        return choices(self.device).head_chunk

    def autocast(self):
        """The autocast region of a forward: on in `autocast_dtype` for this device, or a no-op region."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)
