"""Sampling completions from the student: the `Sampler` interface and its Hugging Face `generate` version.

A sampler turns a list of prompts (token-id lists) into a :class:`SampleBatch`: prompt + completion ids
left-padded into one (B, T) tensor, the masks the loss needs and, when the engine reports them, the
log-probabilities the sampler assigned to the tokens it drew (for the importance ratio of the
sampled-token loss). A vLLM engine or an inference server plugs in by implementing ``sample``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Union

import torch


@dataclass
class SampleBatch:
    """One micro-batch of sampled sequences, shape (B, T) everywhere.

    input_ids: prompt + completion, left-padded with ``pad_token_id``.
    attention_mask: 1 on real tokens (prompt and completion up to and including EOS), 0 on padding.
    loss_mask: bool, True on completion tokens (the tokens the loss is taken on).
    sampler_logprobs: fp32 log-prob the sampler gave token t at position t (0 off the completion), or
        None when the sampler does not report them (the sampled-token loss then treats the current
        student as the sampler, ratio 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sampler_logprobs: Optional[torch.Tensor] = None

    def to(self, device) -> "SampleBatch":
        lp = None if self.sampler_logprobs is None else self.sampler_logprobs.to(device)
        return SampleBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), lp)

    def num_tokens(self) -> torch.Tensor:
        """Completion tokens in the batch, a 0-dim int64 tensor (no host sync)."""
        return self.loss_mask.sum()


class Sampler(Protocol):
    """What the trainer needs from a sampling engine.

    ``sample(prompts)`` draws one completion per prompt from the *current* student. ``sync(model)`` is
    called after each optimizer step so an external engine can load the new weights (HF generate
    samples from the live module and needs nothing).
    """

    def sample(self, prompts: Sequence[Sequence[int]]) -> SampleBatch: ...

    def sync(self, model: torch.nn.Module) -> None: ...


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device=None):
    """(B, T) ids left-padded with ``pad_token_id`` and the matching attention mask."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompts: expected a non-empty list of non-empty token-id lists")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        attn[i, width - len(r):] = 1
    return ids.to(device), attn.to(device)


def completion_mask(generated: torch.Tensor, eos_token_id: Union[None, int, Sequence[int]]) -> torch.Tensor:
    """Bool (B, G): tokens up to and including the first EOS of each row (all when there is none).

    ``eos_token_id`` may be a list (chat models stop on several ids, e.g. end-of-text and end-of-turn).
    """
    eos = _ids(eos_token_id)
    if not eos:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device))
    # EOS tokens strictly before position g: a token is kept while that count is 0.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


class _LogprobRecorder:
    """Last logits processor in ``generate``: records log p(drawn token) from the processed scores.

    A processor sees step i's scores before the token is drawn; the drawn token shows up as the last
    column of ``input_ids`` at step i+1. So it keeps one step's (B, V) log-softmax, never all of them
    (``output_scores=True`` would keep (B, G, V)).
    """

    def __init__(self):
        self.prev = None
        self.taken = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, drawn):
        self.taken.append(self.prev.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
        self.prev = None

    def finish(self, sequences):
        if self.prev is not None:
            self._take(sequences[:, -1])
        return torch.stack(self.taken, dim=1)


class _VocabLimit:
    """Logits processor: ids >= ``vocab_size`` get -inf (they are never drawn)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.vocab_size:
            scores = scores.clone()
            scores[:, self.vocab_size:] = float("-inf")
        return scores


class HFSampler:
    """Samples with ``model.generate`` (temperature, top-p, max new tokens) and reports sampler log-probs.

    The log-probs are those of the distribution actually sampled from: ``log_softmax`` of the scores
    after temperature and top-p, gathered at the drawn tokens. Temperature and top-p are applied by
    our own processor list (generate's are switched off), so that the recorder runs after them whatever
    the model's ``generation_config`` says; top-k, min-p and the like are switched off.

    ``vocab_size``: draw only ids below it (the logits of ids >= ``vocab_size`` are -inf before
    temperature and top-p), so every drawn id is one the teacher accepts when its vocabulary is the
    smaller one; the recorded log-probs are those of that restricted distribution, which is the student
    distribution the losses compare over ``vocab_size`` ids. None: the model's whole vocabulary.

    ``greedy``: take each step's most likely id (below ``vocab_size``) instead of drawing one; temperature
    and top-p are then not applied, and the recorded log-probs are those of the untempered distribution.
    """

    def __init__(self, model: torch.nn.Module, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, pad_token_id: Optional[int] = None,
                 eos_token_id: Union[None, int, Sequence[int]] = None, vocab_size: Optional[int] = None,
                 greedy: bool = False):
        self.model = model
        self.greedy = bool(greedy)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size: expected None or an integer >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        cfg = model.generation_config
        # Stop on the given ids and on the model's own (its generation_config may list end-of-turn ids).
        self.eos_token_id = sorted(set(_ids(eos_token_id)) | set(_ids(cfg.eos_token_id))) or None
        pads = _ids(pad_token_id) or _ids(cfg.pad_token_id) or (self.eos_token_id or [0])
        self.pad_token_id = pads[0]

    def _processors(self, recorder):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        procs = LogitsProcessorList()
        if self.vocab_size is not None:
            procs.append(_VocabLimit(self.vocab_size))
        if self.temperature != 1.0 and not self.greedy:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_p < 1.0 and not self.greedy:
            procs.append(TopPLogitsWarper(top_p=self.top_p))
        procs.append(recorder)
        return procs

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]]) -> SampleBatch:
        device = next(self.model.parameters()).device
        ids, attn = left_pad(prompts, self.pad_token_id, device)
        recorder = _LogprobRecorder()
        was_training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                input_ids=ids, attention_mask=attn, do_sample=not self.greedy, temperature=1.0, top_p=1.0,
                top_k=None if self.greedy else 0,
                min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                logits_processor=self._processors(recorder), max_new_tokens=self.max_new_tokens,
                min_new_tokens=0, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
        finally:
            self.model.train(was_training)
        prompt_len = ids.shape[1]
        gen = sequences[:, prompt_len:]
        keep = completion_mask(gen, self.eos_token_id)
        lp = recorder.finish(sequences)
        lp = torch.where(keep, lp, torch.zeros((), device=lp.device))
        attention = torch.cat([attn, keep.long()], dim=1)
        loss_mask = torch.zeros(sequences.shape, dtype=torch.bool, device=device)
        loss_mask[:, prompt_len:] = keep
        sampler_lp = torch.zeros(sequences.shape, dtype=torch.float32, device=device)
        sampler_lp[:, prompt_len:] = lp
        return SampleBatch(sequences, attention, loss_mask, sampler_lp)

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model


class FunctionSampler:
    """Any sampling engine as a :class:`Sampler`: wrap a function that returns completions.

    ``generate(prompts) -> [(completion_ids, completion_logprobs or None), ...]``, one pair per prompt;
    ``completion_ids`` is what the engine produced (including its stop token, which is trained on),
    ``completion_logprobs`` the engine's log-probs of those tokens. ``on_sync(model)``, when given, runs
    after every optimizer step to push the new weights to the engine. Rows are laid out like
    :class:`HFSampler`'s: prompts left-padded, completions right-padded with ``pad_token_id``.

    A vLLM engine would be wrapped like this (a sketch: vLLM is not installed where this was written and
    this snippet has not been run)::

        def generate(prompts):
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                SamplingParams(temperature=1.0, max_tokens=256, logprobs=0))
            return [(c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
                    for c in (o.outputs[0] for o in outs)]
    """

    def __init__(self, generate, *, pad_token_id: int = 0, on_sync=None):
        self.generate, self.pad_token_id, self.on_sync = generate, int(pad_token_id), on_sync

    def sample(self, prompts: Sequence[Sequence[int]]) -> SampleBatch:
        outs = list(self.generate(prompts))
        if len(outs) != len(prompts):
            raise ValueError(f"generate: expected one completion per prompt ({len(prompts)}), got {len(outs)}")
        ids, attn = left_pad(prompts, self.pad_token_id)
        width = max(len(c) for c, _ in outs)
        b, p = ids.shape
        gen = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        keep = torch.zeros((b, width), dtype=torch.bool)
        have_lp = all(lp is not None for _, lp in outs)
        lp = torch.zeros((b, width), dtype=torch.float32)
        for i, (completion, logprobs) in enumerate(outs):
            n = len(completion)
            gen[i, :n] = torch.as_tensor(list(completion), dtype=torch.long)
            keep[i, :n] = True
            if have_lp:
                if len(logprobs) != n:
                    raise ValueError(f"generate: row {i} has {n} completion ids but {len(logprobs)} log-probs")
                lp[i, :n] = torch.as_tensor(list(logprobs), dtype=torch.float32)
        loss_mask = torch.cat([torch.zeros((b, p), dtype=torch.bool), keep], dim=1)
        sampler_lp = torch.cat([torch.zeros((b, p)), lp], dim=1) if have_lp else None
        return SampleBatch(torch.cat([ids, gen], dim=1), torch.cat([attn, keep.long()], dim=1), loss_mask,
                           sampler_lp)

    def sync(self, model: torch.nn.Module) -> None:
        if self.on_sync is not None:
            self.on_sync(model)


def _ids(token_id) -> List[int]:
    """None, an int or a list of ints -> a list of ints."""
    if token_id is None:
        return []
    if isinstance(token_id, (list, tuple)):
        return [int(t) for t in token_id]
    return [int(token_id)]
