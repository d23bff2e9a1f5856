"""TRPO step: CG against an explicit Fisher solve, the KL bound and improvement on a tiny Llama, LoRA-only
updates, exact restore when the line search fails, and the eager-attention requirement."""

import pytest
import torch

from llmrl.models import build_tiny
from llmrl.objectives.kl import kl_estimate
from llmrl.compute.logprobs import response_logprobs
from llmrl.objectives.policy import BatchCounts, aggregate
from llmrl.objectives.trpo import conjugate_gradient, trpo_step

F64 = torch.float64


# ----------------------------------------------------------------------------- a softmax-linear policy, exact

def softmax_policy(seed=0, S=6, A=3, D=4, zero_adv=False):
    """pi(a | x_s) = softmax(W x_s); one sampled action per state; closures for TRPO; W is the only parameter."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.nn.Linear(D, A, bias=False).to(F64)
    with torch.no_grad():
        policy.weight.copy_(0.5 * torch.randn(A, D, generator=g, dtype=F64))
    X = torch.randn(S, D, generator=g, dtype=F64)
    actions = torch.randint(A, (S,), generator=g)
    adv = torch.zeros(S, dtype=F64) if zero_adv else torch.randn(S, generator=g, dtype=F64)
    rows = torch.arange(S)
    with torch.no_grad():
        old = torch.log_softmax(policy(X), -1)                                   # [S, A]

    def surrogate():
        lp = torch.log_softmax(policy(X), -1)[rows, actions]
        return (torch.exp(lp - old[rows, actions]) * adv).mean()

    def kl():                                                                   # exact mean KL(old || new)
        return (old.exp() * (old - torch.log_softmax(policy(X), -1))).sum(-1).mean()

    def logp_of(w):                                                             # flat W [A*D] -> [S, A]
        return torch.log_softmax(X @ w.view(A, D).T, -1)

    def kl_of(w):                                                               # the same KL, as a function of W
        return (old.exp() * (old - logp_of(w))).sum(-1).mean()

    def fisher():                                                               # mean_s sum_a p_a J_a J_a^T
        J = torch.autograd.functional.jacobian(logp_of, policy.weight.detach().reshape(-1))   # [S, A, A*D]
        return torch.einsum("sa,sai,saj->ij", old.exp(), J, J) / S

    def pieces(*parts):                                                         # (surrogate, kl) of state subsets
        def of(idx):
            def surrogate_part():
                lp = torch.log_softmax(policy(X[idx]), -1)[rows[:len(idx)], actions[idx]]
                return (torch.exp(lp - old[idx, actions[idx]]) * adv[idx]).sum() / S

            def kl_part():
                return (old[idx].exp() * (old[idx] - torch.log_softmax(policy(X[idx]), -1))).sum() / S
            return surrogate_part, kl_part
        return [of(torch.tensor(p)) for p in parts]

    surrogate.pieces = pieces
    return policy, surrogate, kl, fisher, kl_of


def test_kl_hessian_at_start_is_the_fisher():
    policy, _, _, fisher, kl_of = softmax_policy()
    H = torch.autograd.functional.hessian(kl_of, policy.weight.detach().reshape(-1))
    assert torch.allclose(H, fisher(), atol=1e-12)


def test_conjugate_gradient_matches_explicit_solve():
    policy, surrogate, _, fisher, _ = softmax_policy(seed=1)
    (g,) = torch.autograd.grad(surrogate(), policy.weight)
    F = fisher() + 0.1 * torch.eye(12, dtype=F64)
    x, residual, used = conjugate_gradient(lambda v: F @ v, g.reshape(-1), iters=12)
    assert torch.allclose(x, torch.linalg.solve(F, g.reshape(-1)), atol=1e-10)
    assert residual < 1e-8 and used <= 12


@pytest.mark.parametrize("seed", range(3))
def test_trpo_step_is_the_scaled_natural_gradient(seed):
    """Double-backward Fisher-vector products + CG give exactly beta (F + lambda I)^-1 g with
    beta = sqrt(2 delta / s^T (F + lambda I) s), computed here from the explicit Fisher."""
    policy, surrogate, kl, fisher, _ = softmax_policy(seed=seed)
    w0 = policy.weight.detach().clone()
    (g,) = torch.autograd.grad(surrogate(), policy.weight)
    F = fisher() + 0.1 * torch.eye(12, dtype=F64)
    s = torch.linalg.solve(F, g.reshape(-1))
    want = torch.sqrt(2 * 1e-3 / (s @ F @ s)) * s
    with torch.no_grad():
        before = float(surrogate())
    # 12 unknowns: CG is exact after 12 products in exact arithmetic; allow more for float rounding
    out = trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-3, cg_iters=40, cg_damping=0.1)
    assert out["accepted"] and out["step_fraction"] == 1.0 and out["cg_residual"] < 1e-8
    assert torch.allclose((policy.weight.detach() - w0).reshape(-1), want, atol=1e-10)
    with torch.no_grad():
        assert float(kl()) <= 1e-3 and float(surrogate()) > before
        assert float(kl()) == pytest.approx(out["kl"], abs=1e-15)


def test_micro_batched_fisher_products_give_the_same_step():
    """The gradient and every Fisher-vector product summed over parts of the batch (each part's graph freed in
    turn) give the same step as the whole batch's kept graph, to float64 rounding, with the same products."""
    policy, surrogate, kl, _, _ = softmax_policy(seed=3)
    w0 = policy.weight.detach().clone()
    whole = trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-3, cg_iters=40)
    step_whole = policy.weight.detach() - w0
    with torch.no_grad():
        policy.weight.copy_(w0)
    parts = surrogate.pieces([0, 1, 2, 3], [4], [5])
    with torch.no_grad():                                                       # the parts sum to the whole
        assert sum(float(k()) for _, k in parts) == pytest.approx(float(kl()), abs=1e-15)
    split = trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-3, cg_iters=40, micro_batches=parts)
    assert split["accepted"] and split["fvp_count"] == whole["fvp_count"]
    assert torch.allclose(policy.weight.detach() - w0, step_whole, atol=1e-12)
    assert split["kl"] == pytest.approx(whole["kl"], rel=1e-9)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-3, micro_batches=[])


def test_line_search_needs_enough_of_the_expected_improvement():
    """surrogate - M kl has the same g and Fisher at the start (kl and grad kl are 0 there), so the same full step;
    M is set so the full step keeps exactly 5% of its first-order improvement (< accept_ratio 0.1): it is
    rejected, and the half step (about 50%) is accepted. A huge M makes every fraction lose: nothing is accepted."""
    policy, surrogate, kl, _, _ = softmax_policy(seed=2)
    w0 = policy.weight.detach().clone()
    free = trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-3, cg_iters=40)
    assert free["accepted"] and free["step_fraction"] == 1.0
    M = (free["improvement"] - 0.05 * free["expected_improvement"]) / free["kl"]
    for m, fraction in ((M, 0.5), (1e6, None)):
        with torch.no_grad():
            policy.weight.copy_(w0)
        out = trpo_step(policy, [policy.weight], lambda: surrogate() - m * kl(), kl, max_kl=1e-3, cg_iters=40,
                        accept_ratio=0.1)
        if fraction is None:
            assert not out["accepted"] and out["improvement"] < 0 and torch.equal(policy.weight.detach(), w0)
        else:
            assert out["accepted"] and out["step_fraction"] == fraction and out["improvement"] > 0
            assert out["improvement"] >= 0.1 * out["expected_improvement"] and out["kl"] <= 1e-3


def test_zero_gradient_is_not_a_step():
    policy, surrogate, kl, _, _ = softmax_policy(zero_adv=True)
    w0 = policy.weight.detach().clone()
    out = trpo_step(policy, [policy.weight], surrogate, kl, max_kl=1e-2)
    assert not out["accepted"] and torch.equal(policy.weight.detach(), w0)


# ----------------------------------------------------------------------------- the tiny Llama

def tiny_lm(attn="eager", lora=False):
    model, tok = build_tiny(0)
    model.config._attn_implementation = attn
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tok.padding_side = "left"
    enc = tok(["the cat sat on the mat", "two plus two is four", "hello there"], return_tensors="pt", padding=True)
    return model.eval(), enc


def lm_closures(model, enc, T=6, seed=0):
    """Surrogate mean r A and the exact per-state KL(old || new) over the vocabulary, on the last T tokens."""
    ids, attn = enc["input_ids"], enc["attention_mask"]
    mask, targets = attn[:, -T:].float(), ids[:, -T:]
    adv = torch.randn(ids.shape[0], T, generator=torch.Generator().manual_seed(seed))
    counts = BatchCounts.of(mask)

    def logp_all():                                                              # [N, T, V]
        return torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, -T - 1:-1].float(), -1)

    with torch.no_grad():
        old = logp_all()
    old_chosen = old.gather(-1, targets[..., None])[..., 0]

    def surrogate():
        lp = logp_all().gather(-1, targets[..., None])[..., 0]
        return aggregate(torch.exp(lp - old_chosen) * adv, mask, "token-mean", counts)

    def kl():
        return aggregate((old.exp() * (old - logp_all())).sum(-1), mask, "token-mean", counts)

    return surrogate, kl


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_tiny_llama_step_respects_the_kl_bound_and_improves():
    model, enc = tiny_lm()
    surrogate, kl = lm_closures(model, enc)
    with torch.no_grad():
        before = float(surrogate())
    out = trpo_step(model, trainable(model), surrogate, kl, max_kl=0.01)
    assert out["accepted"]
    assert set(out) == {"kl", "improvement", "expected_improvement", "step_fraction", "cg_residual", "accepted",
                        "fvp_count", "time"}
    with torch.no_grad():                                                       # measured again, fresh forwards
        kl_after, after = float(kl()), float(surrogate())
    assert 0 < kl_after <= 0.01 and after > before
    assert kl_after == pytest.approx(out["kl"], rel=1e-5)
    assert after - before == pytest.approx(out["improvement"], rel=1e-4)


def test_tiny_llama_step_with_sampled_kl_through_response_logprobs():
    """The module docstring's recipe: chunked, checkpointed log-probs and a k3 KL(old || new) of the chosen tokens."""
    model, enc = tiny_lm()
    ids, attn, T = enc["input_ids"], enc["attention_mask"], 6
    mask = attn[:, -T:].float()
    counts, adv = BatchCounts.of(mask), torch.randn(3, T, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp_old = response_logprobs(model, ids, attn, T, chunk=4)[0]

    def logp():
        return response_logprobs(model, ids, attn, T, chunk=4, with_entropy=False)[0]

    def surrogate():
        return aggregate(torch.exp(logp() - logp_old) * adv, mask, "token-mean", counts)

    def kl():
        return aggregate(kl_estimate(logp_old, logp(), "k3"), mask, "token-mean", counts)

    out = trpo_step(model, trainable(model), surrogate, kl, max_kl=0.005)
    assert out["accepted"] and out["improvement"] > 0
    with torch.no_grad():
        assert 0 < float(kl()) <= 0.005


def test_tiny_llama_micro_batched_step_matches_the_whole_batch():
    """The same k3 recipe as above, once over the whole batch and once row group by row group (the denominators
    stay the whole batch's): the same step to float32 rounding, on a real causal LM with double backward."""
    model, enc = tiny_lm()
    ids, attn, T = enc["input_ids"], enc["attention_mask"], 6
    mask = attn[:, -T:].float()
    counts, adv = BatchCounts.of(mask), torch.randn(3, T, generator=torch.Generator().manual_seed(2))

    def closures(rows):
        def logp():
            return response_logprobs(model, ids[rows], attn[rows], T, with_entropy=False)[0]
        with torch.no_grad():
            old = logp()
        return (lambda: aggregate(torch.exp(logp() - old) * adv[rows], mask[rows], "token-mean", counts),
                lambda: aggregate(kl_estimate(old, logp(), "k3"), mask[rows], "token-mean", counts))

    start = [p.detach().clone() for p in model.parameters()]
    whole = trpo_step(model, trainable(model), *closures(torch.arange(3)), max_kl=0.005)
    step_whole = [p.detach() - s for p, s in zip(model.parameters(), start)]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    parts = [closures(torch.tensor(r)) for r in ([0, 1], [2])]
    split = trpo_step(model, trainable(model), lambda: sum(s() for s, _ in parts), lambda: sum(k() for _, k in parts),
                      max_kl=0.005, micro_batches=parts)
    assert whole["accepted"] and split["accepted"] and split["step_fraction"] == whole["step_fraction"]
    moved = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
    want = torch.cat([d.reshape(-1) for d in step_whole])
    assert want.norm() > 0 and (moved - want).norm() <= 1e-3 * want.norm()
    assert split["kl"] == pytest.approx(whole["kl"], rel=1e-3)


def test_lora_step_changes_only_lora_parameters():
    model, enc = tiny_lm(lora=True)
    surrogate, kl = lm_closures(model, enc)
    params = trainable(model)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trpo_step(model, params, surrogate, kl, max_kl=0.01)
    assert out["accepted"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_failed_line_search_restores_parameters_exactly():
    """A KL the quadratic model badly underestimates: kl + 1e6 kl^2 has the same Fisher at the start (kl = 0 and
    grad kl = 0 there) but exceeds max_kl at every fraction tried."""
    model, enc = tiny_lm()
    surrogate, kl = lm_closures(model, enc)
    before = [p.detach().clone() for p in model.parameters()]

    def steep_kl():
        k = kl()
        return k + 1e6 * k ** 2

    out = trpo_step(model, trainable(model), surrogate, steep_kl, max_kl=0.01, backtrack_iters=3)
    assert not out["accepted"] and out["kl"] > 0.01 and out["step_fraction"] == 0.25
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_sdpa_attention_needs_eager_or_the_math_kernel():
    """CPU sdpa dispatches to a fused kernel without double backward: a clear error, parameters untouched.
    The same model under the composite MATH kernel steps fine."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, enc = tiny_lm(attn="sdpa")
    surrogate, kl = lm_closures(model, enc)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        trpo_step(model, trainable(model), surrogate, kl, max_kl=0.01)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    with sdpa_kernel(SDPBackend.MATH):
        assert trpo_step(model, trainable(model), surrogate, kl, max_kl=0.01)["accepted"]
