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
}


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
            else f"PPO clip [{1 - o['clip_low']:.2f}, {1 + o['clip_high']:.2f}]")
    objective = "natural gradient" if o.get("update") == "trpo" else o["name"]
    return f"credit={c['estimator']}({opts}){values} | objective={objective}: {clip}, {kl}, aggregation={o['aggregation']}"
