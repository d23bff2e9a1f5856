"""From task examples to a `Rollout`: apply the chat template, sample G responses per prompt (with the native
sampler, or with an engine such as `VLLMEngine` that returns the same `Samples`), decode."""

from __future__ import annotations

import torch

from llmrl.rollout.sampler import generate
from llmrl.rollout.types import Rollout


def encode_prompt(tokenizer, text: str, *, chat_template: bool = True, system_prompt: str | None = None,
                  demo: list[dict] | None = None) -> list[int]:
    """One user message -> prompt token ids (through the tokenizer's chat template when asked). `demo`: chat
    messages (a worked example exchange) put between the system prompt and the user message."""
    demo = demo or []
    if not chat_template:
        return tokenizer("".join(m["content"] + "\n\n" for m in demo) + text, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + demo + [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a response: the tokenizer's EOS token (the model's generation config is not read)."""
    ids = {tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def collect_rollout(
    model,
    tokenizer,
    examples: list,                  # B task examples
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    chat_template: bool = True,
    system_prompt: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    engine=None,                     # None: the native sampler on `model`; else one with `generate(...) -> Samples`
) -> Rollout:
    """Sample `group_size` responses for each example; rows b*G .. b*G+G-1 answer example b."""
    prompts = [encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt)
               for ex in examples]
    kw = dict(group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    if engine is not None:   # its seed drawn from `generator`, so a seeded run repeats
        s = engine.generate(prompts, **kw, seed=int(torch.randint(2**31 - 1, (1,), generator=generator,
                                                                   device=generator.device if generator else "cpu")))
    else:
        was_training = model.training
        model.eval()
        try:
            s = generate(model, prompts, **kw, generator=generator, autocast_dtype=autocast_dtype)
        finally:
            model.train(was_training)
    G = group_size
    completions = tokenizer.batch_decode(s.response_ids * s.response_mask.long()
                                         + tokenizer.pad_token_id * (1 - s.response_mask.long()),
                                         skip_special_tokens=True)
    device = next(model.parameters()).device      # an engine's samples come back on the host: to the policy's device
    return Rollout(
        input_ids=torch.cat([s.prompt_ids, s.response_ids], 1),
        attention_mask=torch.cat([s.prompt_mask, s.response_mask.long()], 1),
        response_mask=s.response_mask,
        logp_old=s.logp,
        group_ids=torch.arange(len(examples), device=s.response_ids.device).repeat_interleave(G),
        completions=completions,
        examples=[ex for ex in examples for _ in range(G)],
        extras={"truncated": s.truncated},
    ).to(device)
