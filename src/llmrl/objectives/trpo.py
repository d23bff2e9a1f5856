"""A true TRPO step: natural gradient by conjugate gradient, scaled to a KL bound, then a backtracking line search.

Schulman et al. 2015, "Trust Region Policy Optimization", sec. 6 and appendix C:

    maximise  L(theta) = E[ pi_theta / pi_old * A ]        subject to   KL(pi_old || pi_theta) <= delta
    g   = grad L                                            at theta_old
    F v = grad (grad KL . v)                                the Hessian of the KL at theta_old = the Fisher matrix
    s  ~= (F + lambda I)^-1 g                               conjugate gradient, `cg_iters` Fisher-vector products
    beta = sqrt(2 delta / s^T (F + lambda I) s)             the largest step along s with 1/2 step^T F step = delta
    theta = theta_old + frac * beta s,  frac = 1, c, c^2, ...   first frac with KL <= delta, L improved (> 0)
                                                            and improvement / (g . step) >= accept_ratio

Deviations: the damping lambda enters the step size too (as in Schulman's modular_rl and Spinning Up), which
makes the step a little shorter; the line search tests the KL bound itself, as appendix C does (modular_rl's
line search checks only the surrogate); if no fraction is accepted the parameters are restored exactly.

Fisher-vector products use double backward (create_graph on the first gradient), so every op in the model needs
a derivative of its backward. Hugging Face attention: "eager" works; "sdpa" does NOT on CPU, because torch 2.13
dispatches it to a fused kernel with no double backward (`_scaled_dot_product_flash_attention_for_cpu_backward`);
the fused CUDA kernels are not tested here. Either load the model with `attn_implementation="eager"` (or set
`model.config._attn_implementation = "eager"`), or keep sdpa and call `trpo_step` inside
`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`, whose composite kernel differentiates twice (both tested).
A model that cannot double-backward gets an error that says so.

Memory. A Fisher-vector product by double backward keeps the first gradient's graph, which grows with the batch's
rows and lengths (on SmolLM2-135M in fp32, bench/trust_region.py's whole-batch TRPO reached 24 GB at 32 rows and
was killed; in 8-row parts it stayed under 13 GB, much of it the conjugate gradient's model-sized vectors). Pass
`micro_batches`, the (surrogate, KL) closures of disjoint parts of the batch whose values sum to the whole's, and
every product is summed part by part, each part's graph built and freed in turn: memory is bounded by one part, at
the cost of one more forward and backward per part per product. The result is the same up to float rounding.

Building the two closures for a causal LM (fp32, no autocast, dropout off via model.eval(): the line search
compares values across forwards; the batch is fixed for the whole step):

    logp_old = response_logprobs(model, ids, attn, T)[0].detach()             # [N, T] before the step
    def surrogate_fn():                                                       # mean r A over chosen tokens
        logp, _ = response_logprobs(model, ids, attn, T, with_entropy=False)
        return aggregate(torch.exp(logp - logp_old) * A, mask, "token-mean", counts)
    def kl_fn():                                                              # k3 estimate of KL(old || new)
        logp, _ = response_logprobs(model, ids, attn, T, with_entropy=False)
        return aggregate(kl_estimate(logp_old, logp, "k3"), mask, "token-mean", counts)

With sampled tokens the KL's Hessian at theta_old is sum_t grad log pi(x_t) grad log pi(x_t)^T, a Monte-Carlo
estimate of the Fisher that needs no [N, T, V] tensor; the exact per-state KL over the vocabulary (as in the
tests) gives the exact Fisher at the cost of keeping the old distributions.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],   # v [D] -> A v [D], A symmetric positive definite
    b: torch.Tensor,                                  # [D]
    *,
    iters: int,
    residual_tol: float = 1e-20,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve A x = b by conjugate gradient (Hestenes & Stiefel 1952) -> (x [D], |b - A x|, matvecs used).

    Stops after `iters` products or once |r|^2 <= residual_tol * |b|^2: relative, so the scale of the surrogate
    does not matter (Schulman's code uses an absolute 1e-10), and by default only at float64 round-off, so in
    float32 all `iters` products run; b = 0 gives x = 0 at once. Exact after D steps in exact arithmetic."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    r_dot_r = r @ r
    stop = residual_tol * r_dot_r
    used = 0
    for _ in range(iters):
        if r_dot_r <= stop:
            break
        Ap = matvec(p)
        used += 1
        alpha = float(r_dot_r / (p @ Ap))
        x.add_(p, alpha=alpha)                       # in place: a [D] vector is the size of the model
        r.sub_(Ap, alpha=alpha)
        new_r_dot_r = r @ r
        p.mul_(float(new_r_dot_r / r_dot_r)).add_(r)
        r_dot_r = new_r_dot_r
    return x, r_dot_r.sqrt(), used


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _assign(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (storage, tying and optimizer references stay intact)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def trpo_step(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    surrogate_fn: Callable[[], torch.Tensor],   # () -> scalar to MAXIMISE at the current params, e.g. mean r A
    kl_fn: Callable[[], torch.Tensor],          # () -> scalar mean KL(pi_old || pi) at the current params (0 at start)
    *,
    max_kl: float,
    cg_iters: int = 10,
    cg_damping: float = 0.1,
    backtrack_iters: int = 10,
    backtrack_coef: float = 0.5,
    accept_ratio: float = 0.1,
    micro_batches: Sequence[tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] | None = None,
) -> dict:
    """One TRPO update of `params` in place (see the module docstring). `model` is only read: its attention
    implementation is named in the error when double backward fails.

    Returns `accepted`; `kl`, `improvement` (surrogate gain), `expected_improvement` (g . step) and
    `step_fraction` of the last candidate tried, which is the accepted one, or with accepted=False the smallest
    one (the parameters are then restored bit for bit); `cg_residual` = |g - (F + lambda I) s|; `fvp_count`;
    `time` in seconds. With `micro_batches` (see the module docstring) the gradient and the Fisher-vector
    products are summed over those parts; `surrogate_fn` and `kl_fn` then serve the line search only, without a
    graph, and should be the parts' sums.
    """
    start = time.perf_counter()
    params = list(params)
    grad = lambda y, **kw: _flat(torch.autograd.grad(y, params, materialize_grads=True, **kw))  # noqa: E731  [D]
    if micro_batches is None:          # one graph for the whole batch, kept for every product
        surrogate = surrogate_fn()
        g = grad(surrogate).detach()                                                                  # [D]
        kl_grad = grad(kl_fn(), create_graph=True)                                                    # [D], 0 at start

        def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:                                   # (F + lambda I) v
            return grad(kl_grad @ v, retain_graph=True).add_(v, alpha=cg_damping)
    else:                              # part by part, each part's graph freed before the next
        if not micro_batches:
            raise ValueError("trpo_step: micro_batches is empty; pass None to use the whole batch at once")
        g = sum(grad(part_surrogate()).detach() for part_surrogate, _ in micro_batches)               # [D]
        with torch.no_grad():
            surrogate = surrogate_fn()

        def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:                                   # (F + lambda I) v
            out = v * cg_damping                        # in place below: one [D] vector live, not one per part
            for _, part_kl in micro_batches:
                out.add_(grad(grad(part_kl(), create_graph=True) @ v))
            return out

    try:
        s, residual, fvp_count = conjugate_gradient(fisher_vector_product, g, iters=cg_iters)
        sFs = float(s @ fisher_vector_product(s))
    except RuntimeError as e:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise RuntimeError(f"TRPO's Fisher-vector product needs double backward through the model, which failed "
                           f"(attention implementation {impl!r}); load the model with attn_implementation='eager' "
                           f"or set model.config._attn_implementation = 'eager' (or, with sdpa, call trpo_step "
                           f"under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)). Cause: {e}") from e
    fvp_count += 1
    result = {"accepted": False, "kl": 0.0, "improvement": 0.0, "expected_improvement": 0.0, "step_fraction": 0.0,
              "cg_residual": float(residual), "fvp_count": fvp_count}
    if not (sFs > 0 and math.isfinite(sFs)):     # zero gradient: nothing to do
        return {**result, "time": time.perf_counter() - start}
    full_step = math.sqrt(2.0 * max_kl / sFs) * s.detach()            # [D]
    expected_full = float(g @ full_step)
    theta_old = _flat([p.detach() for p in params]).clone()
    surrogate_old = float(surrogate.detach())
    with torch.no_grad():
        for i in range(backtrack_iters):
            fraction = backtrack_coef ** i
            _assign(params, theta_old + fraction * full_step)
            kl, improvement = float(kl_fn()), float(surrogate_fn()) - surrogate_old
            expected = expected_full * fraction
            result.update(kl=kl, improvement=improvement, expected_improvement=expected, step_fraction=fraction)
            if kl <= max_kl and improvement > 0 and improvement >= accept_ratio * expected:
                result["accepted"] = True
                break
        else:
            _assign(params, theta_old)
    return {**result, "time": time.perf_counter() - start}
