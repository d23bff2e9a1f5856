"""The policy under torchrun: wrapped for DDP or FSDP2 so that its gradients come out summed over the ranks.

    policy = wrap_policy(model, "ddp")                       # model itself in one process
    logp, entropy = policy_logprobs(policy, ids, attn, T)    # through the wrapper's forward: its hooks run
    with grad_sync(policy, sync=last_micro_batch):
        (loss * loss_scale()).backward()                     # ranks' gradients averaged -> (W * their sum) / W
    with full_params(policy):                                # FSDP: whole weights for sampling and evaluation
        collect_rollout(model, ...)

The log-prob code reads the decoder and the output head of a causal LM directly (`response_logprobs`), so the
wrappers go around a small module whose forward is that function (`LogprobForward`): DDP's gradient hooks and
FSDP's all-gathers then run on every training forward. The sampler, the evaluation and the reference keep using
the plain Hugging Face `model`.

DDP (`torch.nn.parallel.DistributedDataParallel`): a full copy per rank, rank 0's weights broadcast at wrapping;
gradients accumulate locally over micro-batches (`no_sync`) and are all-reduced (averaged) on the last one.
FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer, then the root, sharded over the ranks
(parameters, gradients and the optimizer's state are DTensors holding 1/W each); every forward all-gathers a
layer's weights, every backward reduce-scatters (averages) its gradients. Both average, so the loss is scaled by
W (`loss_scale`) and the result is the sum over ranks of gradients whose losses divide by global counts: the
single-process gradient of the global batch. Every rank must run the same number of forward/backward passes
(`update.policy_update` pads a rank short of micro-batches with zero-weight ones).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from llmrl.compute.logprobs import LogprobForward
from llmrl.distributed import runtime as D


def check_parallel(cfg, resume_from=None) -> None:
    """Fail before training on a composition the data-parallel runtime does not support (`resume_from`: the
    checkpoint the run would continue from)."""
    if D.world() == 1:
        return
    if cfg.run.parallel == "fsdp" and (cfg.run.save_every or resume_from is not None):
        raise ValueError("run.parallel=fsdp writes and reads no resumable checkpoints yet (its parameters and "
                         "optimizer state are sharded over the ranks): set run.save_every=0 and run.resume=never, "
                         "or use run.parallel=ddp")
    if cfg.objective.update == "trpo":
        raise ValueError("objective.update=trpo runs in one process only: its conjugate gradient and line search "
                         "would need Fisher-vector products, surrogate and KL values reduced over the ranks; "
                         "run it without torchrun")
    if cfg.run.parallel == "fsdp" and cfg.model.lora_r:
        raise ValueError("run.parallel=fsdp does not support LoRA (model.lora_r > 0): the reference reads the "
                         "base weights through the sharded model; use run.parallel=ddp with LoRA")
    if cfg.run.parallel == "fsdp" and cfg.credit.values == "critic" and cfg.critic.shared_trunk:
        raise ValueError("run.parallel=fsdp does not support critic.shared_trunk: the value head would read the "
                         "sharded trunk outside the policy's forward; set critic.shared_trunk=false")
    if cfg.rollout.prompts_per_step % D.world():
        raise ValueError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must divide by the number of "
                         f"ranks ({D.world()}): each rank samples whole groups of an equal share of the prompts")


def wrap_policy(model: nn.Module, parallel: str) -> nn.Module:
    """`model` wrapped for data-parallel training (`parallel`: ddp | fsdp); `model` itself in one process.
    Build the optimizer over the returned module's parameters (FSDP replaces them with sharded DTensors)."""
    if D.world() == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device          # one GPU per process (cuda:LOCAL_RANK), or the CPU
        return DistributedDataParallel(LogprobForward(model), device_ids=[device] if device.type == "cuda" else None)
    if parallel != "fsdp":
        raise ValueError(f"run.parallel must be ddp or fsdp, got {parallel!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (D.world(),))
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: FSDP shards per decoder layer and found no decoder .layers")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    policy = fully_shard(LogprobForward(model), mesh=mesh)     # the root: embeddings, final norm, output head
    with torch.no_grad():   # the first forward through the root makes it FSDP's root (before any sampling)
        ids = torch.ones(1, 2, dtype=torch.long, device=device)
        policy(ids, torch.ones_like(ids), 1, with_entropy=False)
    policy.reshard()
    return policy


def loss_scale() -> float:
    """W: DDP and FSDP average the ranks' gradients; scaled losses make the average their sum."""
    return float(D.world())


@contextlib.contextmanager
def grad_sync(policy, sync: bool):
    """DDP: accumulate locally (no all-reduce) unless `sync`; FSDP and one process: every backward as is."""
    if not sync and hasattr(policy, "no_sync"):
        with policy.no_sync():
            yield
    else:
        yield


def average_gradients(params) -> None:
    """All-reduce (average) the gradients of parameters outside the wrapper (the critic), as DDP does its own."""
    if D.world() == 1:
        return
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= D.world()


def _fsdp_modules(policy) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_params(policy):
    """FSDP: every weight gathered whole for the block, for code that calls the Hugging Face model directly
    (sampling, evaluation, Monte-Carlo branches: each rank a different number of forwards, so no collective
    may run inside). All ranks enter together. DDP and one process: nothing to do."""
    modules = _fsdp_modules(policy) if D.world() > 1 else []
    if not modules:
        yield
        return
    layers = [m for m in modules if m is not policy]
    for m in modules:
        m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
        for m in modules:
            m.reshard()


def full_model(model: nn.Module) -> nn.Module | None:
    """The model to save, on rank 0 (None on the others): itself, or under FSDP a plain copy with the gathered
    weights (every rank must call: the gathering is a collective)."""
    sharded = D.world() > 1 and any(type(p).__name__ == "DTensor" for p in model.parameters())
    if not sharded:
        return model if D.is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not D.is_main():
        return None
    plain = type(model)(model.config)
    plain.load_state_dict(state)
    return plain.to(next(iter(state.values())).dtype)
