"""Supervised fine-tuning (`llmrl sft`): the mean negative log-likelihood of completion tokens, on the shared
supervised loop (`train/supervised.py`: checkpoints, --resume, time limit, progress bar, TensorBoard / W&B).

    summary = train_sft(cfg)                       # cfg: SftTrainConfig
    summary = train_sft(cfg, examples=rows)        # rejection-sampling FT (`train/rft.py`) passes its own rows

Data: sft.data_path (prompt/completion or chat messages, `data/sft.py`), or, when unset, correct worked answers
made from `task` (written to RUN_DIR/sft_data.jsonl, read back on resume). The prompt goes through the chat
template with the generation prompt, as when sampling; the completion is its tokens + EOS, and only those carry
loss. Rows are packed padding-free (`sft.pack_tokens`). LoRA or full fine-tuning; the final model is plain.
Held-out: the NLL of held-out completions, and the task's greedy accuracy when `task` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmrl.config_supervised import SftTrainConfig
from llmrl.compute.logprobs import response_logprobs
from llmrl.compute.settings import resolve_autocast
from llmrl.data.sft import SftExample, read_sft, worked_examples, write_sft
from llmrl.models import load_model
from llmrl.models.lora import add_lora
from llmrl.rewards.learned import encode_any_prompt, encode_response
from llmrl.rollout.sampler import left_pad
from llmrl.train.evaluate import evaluate
from llmrl.train.pairs import task_of
from llmrl.train.supervised import fit

Encoded = tuple[list[int], list[int]]      # (prompt ids, completion ids + EOS)


def encode_example(tokenizer, row: SftExample, *, chat_template: bool, system_prompt: str | None,
                   max_length: int | None) -> Encoded:
    """(prompt ids, completion ids + EOS), the completion cut so that both fit in `max_length`."""
    prompt = encode_any_prompt(tokenizer, row.prompt, chat_template, system_prompt=system_prompt)
    completion = encode_response(tokenizer, row.completion)
    if max_length is not None:
        if len(prompt) >= max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a completion within "
                             f"{max_length} tokens: {str(row.prompt)[:80]!r}")
        completion = completion[:max_length - len(prompt)]
    return prompt, completion


def collate(rows: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [n, P+T], attention_mask [n, P+T], completion_mask [n, T]): prompts left-padded, completions
    right-padded, the Rollout layout. completion_mask is 1 on completion tokens only: the loss mask."""
    prompts, prompt_mask = left_pad([p for p, _ in rows], pad_id)                           # [n, P]
    T = max(len(c) for _, c in rows)
    completions = torch.full((len(rows), T), pad_id, dtype=torch.long)                      # [n, T]
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (_, c) in enumerate(rows):
        completions[i, :len(c)], mask[i, :len(c)] = torch.tensor(c, dtype=torch.long), 1
    return torch.cat([prompts, completions], 1), torch.cat([prompt_mask, mask], 1), mask


def nll_sum(model, rows: list[Encoded], pad_id: int, *, pack_tokens: int | None, amp) -> torch.Tensor:
    """-sum of log pi(completion token | prompt, completion so far) over the rows' completion tokens (scalar)."""
    input_ids, attention_mask, mask = collate(rows, pad_id)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        logp, _ = response_logprobs(model, input_ids, attention_mask, mask.shape[1], with_entropy=False,
                                    pack_tokens=pack_tokens)                                # [n, T]
    return -torch.where(mask.bool(), logp.float(), torch.zeros((), dtype=torch.float32)).sum()


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the rows held out (at least one when fraction > 0)."""
    if not fraction or len(rows) < 2:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(1, int(len(rows) * fraction))
    held = set(order[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def sft_rows(cfg: SftTrainConfig, task, run_dir: Path, resuming: bool) -> tuple[list, list]:
    """(train, held-out) SftExamples: read from sft.data_path, or worked answers made from the task."""
    s = cfg.sft
    built = Path(run_dir) / "sft_data.jsonl"
    if s.data_path is not None:
        rows = read_sft(s.data_path)
    elif resuming and built.exists():
        rows = read_sft(built)
    else:
        rows = worked_examples(task, s.build_examples, seed=cfg.run.seed)
        write_sft(rows, built)
    if s.heldout_path is not None:
        return rows, read_sft(s.heldout_path)
    return split_rows(rows, s.heldout_fraction, cfg.run.seed)


class SftTask:
    """SFT on completion tokens, for the supervised loop."""
    desc, shown = "sft steps", ("loss_nll", "token_accuracy")

    def __init__(self, cfg: SftTrainConfig, run_dir: Path, resuming: bool, examples: list[SftExample] | None = None):
        s, m = cfg.sft, cfg.model
        self.cfg = cfg
        self.epochs, self.batch_size, self.micro_batch_size = s.epochs, s.batch_size, cfg.optim.micro_batch_size
        self.amp = resolve_autocast(m.autocast)
        self.task = task_of(cfg)
        model, self.tokenizer = load_model(m.name, dtype=getattr(torch, m.dtype))
        model.config.use_cache = False
        train, heldout = (examples, []) if examples is not None else sft_rows(cfg, self.task, run_dir, resuming)
        if not train:
            raise ValueError("no training examples")
        limit = s.max_length or getattr(model.config, "max_position_embeddings", None)
        enc = lambda r: encode_example(self.tokenizer, r, chat_template=m.chat_template,  # noqa: E731
                                       system_prompt=m.system_prompt, max_length=limit)
        self.train_enc, self.heldout_enc = [enc(r) for r in train], [enc(r) for r in heldout]
        self.n_train = len(self.train_enc)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            l = cfg.lora
            model = add_lora(model, r=l.r, alpha=l.alpha, dropout=l.dropout, targets=l.target_modules)
        self.model = model
        self.heldout_examples = self.task.heldout(cfg.task.heldout_size) if self.task is not None else []
        self.eval_tokens = cfg.run.eval_max_new_tokens or 64

    def _nll(self, rows: list[Encoded]) -> torch.Tensor:
        return nll_sum(self.model, rows, self.tokenizer.pad_token_id, pack_tokens=self.cfg.sft.pack_tokens,
                       amp=self.amp)

    def loss(self, micro: torch.Tensor, batch: torch.Tensor):
        n_tokens = sum(len(self.train_enc[i][1]) for i in batch.tolist())    # the mean over the batch's tokens
        nll = self._nll([self.train_enc[i] for i in micro.tolist()]) / n_tokens
        return nll, float(nll.detach())

    def metrics(self, parts: list[float], batch: torch.Tensor) -> dict[str, float]:
        loss = sum(parts)
        return {"loss_nll": loss, "token_accuracy": float(torch.tensor(-loss).exp())}   # geometric-mean p(token)

    def counts(self, batch: torch.Tensor) -> dict[str, int]:
        return {"examples": len(batch), "tokens": sum(len(self.train_enc[i][1]) for i in batch.tolist())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        rec = {}
        was_training = self.model.training
        self.model.eval()
        if self.heldout_enc:
            total = sum(float(self._nll(self.heldout_enc[i:i + self.micro_batch_size]))
                        for i in range(0, len(self.heldout_enc), self.micro_batch_size))
            rec["heldout_loss_nll"] = total / sum(len(c) for _, c in self.heldout_enc)
        if self.heldout_examples:
            m = self.cfg.model
            ev = evaluate(self.model, self.tokenizer, self.heldout_examples, max_new_tokens=self.eval_tokens,
                          autocast_dtype=self.amp, chat_template=m.chat_template, system_prompt=m.system_prompt)
            rec |= {"heldout_accuracy": ev["accuracy"], "heldout_response_length": ev["response_length"]}
        self.model.train(was_training)
        return rec

    def summary(self) -> dict[str, int]:
        return {"train_examples": self.n_train, "heldout_examples": len(self.heldout_enc)}


def train_sft(cfg: SftTrainConfig, *, examples: list[SftExample] | None = None, progress: bool | None = None
              ) -> dict:
    """Run one SFT job. Returns a summary: held-out metrics before and after."""
    return fit(cfg, lambda run_dir, resuming: SftTask(cfg, run_dir, resuming, examples), progress=progress)
