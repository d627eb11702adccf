"""Greedy decoding from a prefilled prompt, teacher forcing, and KL against a reference.

Both extend exactly the cache a method linked (`EpicEngine.extend`), so a method's
answer and its distributions come from that cache and nothing else.
"""

from __future__ import annotations

import torch


def greedy_decode(engine, prefilled, prompt_length: int, max_new_tokens: int):
    """(token ids, per-step logits) of the greedy continuation of a prefilled prompt.

    The ids end with the stop token when one was chosen; `steps[t]` is the [vocab]
    distribution `ids[t]` was chosen from.
    """
    ids: list[int] = []
    logits = prefilled.logits
    steps = [logits]
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        ids.append(token)
        if token in engine.stop_token_ids or step == max_new_tokens - 1:
            break
        logits = engine.extend(prefilled, [token], at=prompt_length + step)[-1]
        steps.append(logits)
    return ids, steps


def teacher_forced_logits(engine, prefilled, prompt_length: int, forced: list[int]) -> torch.Tensor:
    """[len(forced), vocab] next-token logits along `forced` (step 0 is the prefill's own)."""
    if len(forced) <= 1:
        return prefilled.logits[None]
    later = engine.extend(prefilled, forced[:-1], at=prompt_length)
    return torch.cat([prefilled.logits[None], later])


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of [.., vocab] logits, in nats."""
    ref_log = torch.log_softmax(reference.double(), dim=-1)
    other_log = torch.log_softmax(other.double(), dim=-1)
    return (ref_log.exp() * (ref_log - other_log)).sum(-1)
