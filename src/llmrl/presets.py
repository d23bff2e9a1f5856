"""Named algorithm compositions. A preset is a few declarative lines: which credit estimator, which
objective and which constraints; anything it sets, a config file or a `key=value` override can change.

    reinforce    = terminal reward broadcast to every token + plain policy gradient   (Williams 1992)
    rloo         = leave-one-out baseline + plain policy gradient                     (Ahmadian et al. 2024)
    grpo         = group baseline, std-normalised + PPO clip + k3 KL in the loss      (Shao et al. 2024)
    dr_grpo      = group mean, no std + PPO clip + constant-length aggregation        (Liu et al. 2025)
    reinforce_pp = global advantage normalisation + PPO clip + k1 KL in the reward    (Hu 2025)
    ppo          = critic + GAE + PPO clip + k1 KL in the reward                      (Ouyang et al. 2022)
    trpo         = critic + GAE + natural-gradient step under a KL bound             (Schulman et al. 2015)
    vineppo      = Monte-Carlo step values from branched rollouts + PPO clip          (Kazemnejad et al. 2024)
    dapo         = group baseline + clip-higher [0.8, 1.28] + token-level loss + dynamic sampling + soft overlong
                   penalty, no KL                                                     (Yu et al. 2025)
    gspo         = group baseline + sequence-level ratio clipped per sequence          (Zheng et al. 2025)
    cispo        = group baseline + clipped, detached IS weight on every token        (MiniMax 2025)
    dppo         = group baseline + binary-TV divergence mask instead of ratio clip   (Qi et al. 2026)

The last four take two minibatches per rollout (two optimizer steps on halves of it): on one on-policy pass every
ratio is exactly 1 and each of these objectives is the plain policy gradient
(tests/objectives/test_trust_region_objectives.py), so only data reuse lets their trust regions act.
"""

from __future__ import annotations

NO_CLIP = {"clip_low": 1.0, "clip_high": 1.0e9}   # ratio bounds [0, 1e9]: the clip never binds

PRESETS: dict[str, dict] = {
    "reinforce": {
        "credit": {"estimator": "broadcast", "options": {}, "values": "none"},
        "objective": {"name": "ppo_clip", **NO_CLIP, "kl_coef": 0.0, "aggregation": "seq-mean-token-sum"},
    },
    "rloo": {
        "credit": {"estimator": "rloo", "options": {}, "values": "none"},
        "objective": {"name": "ppo_clip", **NO_CLIP, "kl_coef": 0.0, "aggregation": "seq-mean-token-sum"},
    },
    "grpo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}, "values": "none"},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.04, "kl_estimator": "k3",
                      "kl_placement": "loss", "aggregation": "seq-mean-token-mean"},
    },
    "dr_grpo": {
        "credit": {"estimator": "dr_grpo", "options": {}, "values": "none"},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0,
                      "aggregation": "seq-mean-token-sum-norm"},
    },
    "reinforce_pp": {
        "credit": {"estimator": "reinforce_pp", "options": {}, "values": "none"},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.01, "kl_estimator": "k1",
                      "kl_placement": "reward", "aggregation": "token-mean"},
    },
    "ppo": {
        "credit": {"estimator": "gae", "options": {"gamma": 1.0, "lam": 0.95}, "values": "critic"},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.01, "kl_estimator": "k1",
                      "kl_placement": "reward", "aggregation": "token-mean"},
    },
    "trpo": {
        "credit": {"estimator": "gae", "options": {"gamma": 1.0, "lam": 0.95}, "values": "critic"},
        "objective": {"name": "ppo_clip", "update": "trpo", "max_kl": 0.01, "cg_iters": 10, "kl_coef": 0.0,
                      "aggregation": "token-mean"},
    },
    "vineppo": {
        "credit": {"estimator": "vineppo", "options": {}, "values": "monte_carlo", "steps": "blank_line",
                   "mc_samples": 4},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0, "aggregation": "token-mean"},
    },
    "dapo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}, "values": "none"},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0,
                      "aggregation": "token-mean", "minibatches": 2},
        "rollout": {"sampling": "dynamic", "dynamic_max_rounds": 4, "overlong_buffer": 0.2, "overlong_weight": 1.0},
    },
    "gspo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}, "values": "none"},
        "objective": {"name": "gspo", "clip_low": 3.0e-4, "clip_high": 4.0e-4, "kl_coef": 0.0,
                      "aggregation": "seq-mean-token-mean", "minibatches": 2},
    },
    "cispo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}, "values": "none"},
        "objective": {"name": "cispo", "clip_low": 1.0, "clip_high": 4.0, "kl_coef": 0.0,
                      "aggregation": "token-mean", "minibatches": 2},
    },
    "dppo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}, "values": "none"},
        "objective": {"name": "dppo", "options": {"divergence": "tv", "delta_low": 0.1, "delta_high": 0.1},
                      "kl_coef": 0.0, "aggregation": "token-mean", "minibatches": 2},
    },
}


def _bound(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:.5g}"


def describe_preset(name: str) -> str:
    """One line: what the preset is composed of."""
    p = PRESETS[name]
    c, o = p["credit"], p["objective"]
    opts = ", ".join(f"{k}={v}" for k, v in c.get("options", {}).items())
    values = f" with V from {c['values']}" if c.get("values", "none") != "none" else ""
    values += f", steps by {c['steps']}" if c.get("steps", "none") != "none" else ""
    kl = (f"KL {o.get('kl_estimator', 'k3')} in the {o.get('kl_placement', 'loss')} (beta={o['kl_coef']})"
          if o.get("kl_coef") else "no KL")
    clip = ("no clip" if o.get("clip_high", 0) >= 1e6
            else f"TRPO step, KL(old || new) <= {o['max_kl']}" if o.get("update") == "trpo"
            else f"options {o['options']}" if "options" in o
            else f"{'PPO clip' if o['name'] == 'ppo_clip' else 'clip'} [{_bound(1 - o['clip_low'])}, "
                 f"{_bound(1 + o['clip_high'])}]")
    objective = "natural gradient" if o.get("update") == "trpo" else o["name"]
    reuse = f", {o['minibatches']} minibatches" if o.get("minibatches", 1) > 1 else ""
    r = p.get("rollout", {})
    sampling = "".join(f", {k}={v}" for k, v in r.items())
    return (f"credit={c['estimator']}({opts}){values} | objective={objective}: {clip}, {kl}, "
            f"aggregation={o['aggregation']}{reuse}{sampling}")
