"""Named algorithm compositions. A preset is a few declarative lines: which credit estimator, which
objective and which constraints; anything it sets, a config file or a `key=value` override can change.

    grpo      = group baseline (mean, std-normalised) + PPO clip + k3 KL in the loss   (Shao et al. 2024)
    dr_grpo   = group-mean baseline, no std + PPO clip + constant-length aggregation  (Liu et al. 2025)
    reinforce = broadcast terminal reward + plain policy gradient                       (Williams 1992)
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "grpo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": True}},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.04, "kl_estimator": "k3",
                      "aggregation": "seq-mean-token-mean"},
    },
    "dr_grpo": {
        "credit": {"estimator": "grpo", "options": {"normalize_std": False}},
        "objective": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0,
                      "aggregation": "seq-mean-token-sum-norm"},
    },
    "reinforce": {
        "credit": {"estimator": "broadcast", "options": {}},
        "objective": {"name": "ppo_clip", "clip_low": 1.0, "clip_high": 1.0e9, "kl_coef": 0.0,
                      "aggregation": "seq-mean-token-sum"},
    },
}


def describe_preset(name: str) -> str:
    """One line: what the preset is composed of."""
    p = PRESETS[name]
    c, o = p["credit"], p["objective"]
    opts = ", ".join(f"{k}={v}" for k, v in c.get("options", {}).items())
    kl = f"KL {o['kl_estimator']} in loss (beta={o['kl_coef']})" if o.get("kl_coef") else "no KL"
    clip = ("no clip" if o.get("clip_high", 0) >= 1e6
            else f"PPO clip [{1 - o['clip_low']:.2f}, {1 + o['clip_high']:.2f}]")
    return f"credit={c['estimator']}({opts}) | objective={o['name']}: {clip}, {kl}, aggregation={o['aggregation']}"
