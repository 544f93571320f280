"""Pipelined generation: prefill and decode with a key/value cache per stage and lane.

The batch of prompts is cut into *lanes* (micro-batches of sequences). Each stage keeps one
cache per lane for its own layers. The program is data (:func:`generation_program`): action
``(stage, lane, step)`` runs stage ``stage`` on lane ``lane`` at step ``step`` (step 0 is the
prefill of the prompt, step ``t`` the decode of the token chosen at step ``t - 1``). The
global order is step by step, lane by lane, stage by stage; every rank runs its own actions in
that order, so while lane 0's token travels back from the last stage to the first, lanes
1, 2, ... occupy the other stages::

    stage 0:  P0 P1 P2 P3 D0 D1 D2 D3 ...       (P: prefill, D: decode, digit: lane)
    stage 1:     P0 P1 P2 P3 D0 D1 D2 ...
    last  :        P0 P1 P2 P3 D0 D1 ...   token of lane 0 -> stage 0

Messages follow from the program: after ``(s, l, t)`` the hidden state goes to ``(s+1, l, t)``;
after the last stage's ``(last, l, t)`` the chosen tokens go to ``(0, l, t+1)``. Both ends derive
their order from the program, so no tags are needed.

Every rank knows every lane's attention mask and positions (the prompt's, extended by one
each step), so only hidden states and tokens travel. Sequences that produced ``eos_token_id``
get ``pad_token_id`` from then on; all steps run, and the result is cut after the step at
which every sequence had finished, as ``model.generate`` stops there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..schedule.links import Message

__all__ = ["Decode", "GenerationRun", "choose_tokens", "generation_program", "incoming_messages",
           "message_in", "message_out"]

HIDDEN, TOKEN = "hidden", "token"


@dataclass(frozen=True, slots=True)
class Decode:
    """Run ``stage`` on ``lane`` at ``step`` (0: prefill of the prompt)."""

    stage: int
    lane: int
    step: int

    def __str__(self) -> str:
        return f"{'P' if self.step == 0 else 'D'}{self.stage}/{self.lane}@{self.step}"


def generation_program(n_stages: int, n_lanes: int, n_steps: int) -> Iterator[Decode]:
    """Every action in a legal global order: step by step, lane by lane, stage by stage."""
    for step in range(n_steps):
        for lane in range(n_lanes):
            for stage in range(n_stages):
                yield Decode(stage, lane, step)


def _number(action: Decode, n_lanes: int) -> int:
    return action.step * n_lanes + action.lane


def message_in(action: Decode, n_stages: int, n_lanes: int) -> tuple[Message, int] | None:
    """The message ``action`` waits for and the stage that sends it, or None (a prefill on stage 0)."""
    if action.stage > 0:
        return Message(HIDDEN, action.stage - 1, _number(action, n_lanes)), action.stage - 1
    if action.step > 0:
        previous = Decode(n_stages - 1, action.lane, action.step - 1)
        return Message(TOKEN, n_stages - 1, _number(previous, n_lanes)), n_stages - 1
    return None


def message_out(action: Decode, n_stages: int, n_lanes: int, n_steps: int) -> tuple[Message, int] | None:
    """The message ``action`` sends and the stage that receives it, or None (the last step's tokens)."""
    if action.stage < n_stages - 1:
        return Message(HIDDEN, action.stage, _number(action, n_lanes)), action.stage + 1
    if action.step + 1 < n_steps:
        return Message(TOKEN, action.stage, _number(action, n_lanes)), 0
    return None


def incoming_messages(n_stages: int, n_lanes: int, n_steps: int, rank_of: Callable[[int], int],
                      rank: int) -> dict[int, list[Message]]:
    """For ``rank``: every other rank it receives from, with the messages in that rank's sending order."""
    links: dict[int, list[Message]] = {}
    for action in generation_program(n_stages, n_lanes, n_steps):
        sent = message_out(action, n_stages, n_lanes, n_steps)
        if sent is None:
            continue
        message, target = sent
        source = rank_of(action.stage)
        if rank_of(target) == rank and source != rank:
            links.setdefault(source, []).append(message)
    return links


def choose_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int | None,
                  top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: the argmax, or a sample after temperature, top-k and top-p
    (in that order, as Hugging Face's warpers apply them)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k is not None and top_k > 0:
        k = min(top_k, scores.shape[-1])
        threshold = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probabilities = scores.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be non-negative, got {top_k}")


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


class GenerationRun:
    """One call of ``generate``: the lanes, the program, and what the last stage collects.

    ``stages`` are this process's generation stages (index -> stage); ``send(message, stage,
    value)`` hands a value to stage ``stage``, ``receive(message, stage)`` takes one from
    ``stage``; the host supplies both (the transport between ranks, or memory in one process).
    """

    def __init__(self, stages: dict[int, Any], n_stages: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, max_new_tokens: int, n_lanes: int, *,
                 do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                 eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                 generator: torch.Generator | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt length], got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        if not 1 <= n_lanes <= batch:
            raise ValueError(f"{n_lanes} lanes (n_microbatches) for a batch of {batch} prompts: use 1..{batch}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}")
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        self.stages, self.n_stages, self.n_lanes, self.n_steps = stages, n_stages, n_lanes, max_new_tokens
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
        self.eos = _eos_list(eos_token_id)
        if self.eos and pad_token_id is None:
            pad_token_id = self.eos[0]
        self.pad = pad_token_id
        self.input_ids = input_ids
        rows = torch.arange(batch).tensor_split(n_lanes)
        self.rows = [(int(r[0]), int(r[-1]) + 1) for r in rows]
        if attention_mask is not None:
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 0)
            if bool((attention_mask == 1).all()):  # model.generate drops an all-ones mask
                attention_mask = None
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1)
        self.attention_mask, self.positions = attention_mask, positions
        self.caches = {(stage, lane): module.new_cache() for stage, module in stages.items()
                       for lane in range(n_lanes)}
        self.tokens: list[list[torch.Tensor]] = [[] for _ in range(n_lanes)]
        self.unfinished = [torch.ones(end - start, dtype=torch.bool, device=input_ids.device)
                           for start, end in self.rows]

    def actions(self) -> Iterator[Decode]:
        """This process's actions, in program order."""
        return (action for action in generation_program(self.n_stages, self.n_lanes, self.n_steps)
                if action.stage in self.stages)

    def _mask_and_positions(self, lane: int, step: int, device: torch.device) -> tuple[torch.Tensor | None,
                                                                                       torch.Tensor]:
        start, end = self.rows[lane]
        prompt_positions = self.positions[start:end]
        if step == 0:
            positions = prompt_positions
        else:
            positions = prompt_positions[:, -1:] + step
        mask = None
        if self.attention_mask is not None:
            mask = self.attention_mask[start:end]
            if step > 0:
                mask = torch.cat([mask, mask.new_ones((end - start, step))], dim=-1)
            mask = mask.to(device)
        return mask, positions.to(device)

    def run(self, action: Decode, value: Any, device: torch.device) -> Any:
        """Run ``action`` on its input ``value`` (None for a prefill on stage 0); returns what it sends."""
        stage = self.stages[action.stage]
        if action.stage == 0:
            start, end = self.rows[action.lane]
            value = self.input_ids[start:end] if action.step == 0 else value.reshape(-1, 1)
        mask, positions = self._mask_and_positions(action.lane, action.step, device)
        output = stage(value.to(device), mask, positions, self.caches[(action.stage, action.lane)])
        if action.stage < self.n_stages - 1:
            return output
        tokens = choose_tokens(output, **self.sampling)
        unfinished = self.unfinished[action.lane].to(tokens.device)
        if self.pad is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, self.pad))
        if self.eos:
            done = torch.isin(tokens, torch.tensor(self.eos, device=tokens.device))
            self.unfinished[action.lane] = unfinished & ~done
        self.tokens[action.lane].append(tokens)
        return tokens

    def result(self) -> tuple[torch.Tensor, int]:
        """On the last stage's process: ``[batch, prompt + max_new_tokens]`` and the number of new
        tokens ``model.generate`` would have kept (up to the step every sequence had finished)."""
        new = torch.cat([torch.stack(lane, dim=1).cpu() for lane in self.tokens], dim=0)
        kept = self.n_steps
        if self.eos:
            done = torch.isin(new, torch.tensor(self.eos))
            finished_at = torch.where(done.any(dim=1), done.int().argmax(dim=1) + 1,
                                      torch.full((new.shape[0],), self.n_steps))
            kept = int(finished_at.max())
        return torch.cat([self.input_ids.cpu(), new], dim=1), kept
