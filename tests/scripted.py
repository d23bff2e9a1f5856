"""A scripted stand-in for the sampler's `sample_next`, shared by the episode and tool tests."""

import torch


def forced_sample_next(scripts, stopped=lambda script, t: False):
    """sample_next emitting scripts[row][step] (the last token repeated past the end), with the real model's
    log-prob of that token (so drift is measurable). The sampler drops stopped rows from its batch:
    `stopped(script, t)` says whether a row ended at step t."""
    step = {"t": 0, "rows": list(range(len(scripts)))}

    def sample_next(logits, temperature, top_p, generator=None):
        t = step["t"]
        step["t"] += 1
        if logits.shape[0] < len(step["rows"]):           # the batch was compacted to the rows still running
            step["rows"] = [r for r in step["rows"] if not any(stopped(scripts[r], u) for u in range(t))]
        assert logits.shape[0] == len(step["rows"])
        token = torch.tensor([scripts[r][min(t, len(scripts[r]) - 1)] for r in step["rows"]])
        logp_all = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
        return token, logp_all.gather(-1, token[:, None])[:, 0]
    return sample_next
