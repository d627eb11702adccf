"""Greedy decoding from a prefilled cache, teacher forcing, and KL against a reference.

These run tokens against the engine's positional cache with `engine._forward`, so a
method's answer and its distributions come from exactly the cache it linked. Teacher
forcing reads every position's hidden state through a forward hook on the last
decoder layer (the engine itself only returns the last position's logits).
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_decode(engine, cache, logits: torch.Tensor, length: int, max_new_tokens: int):
    """(token ids, per-step logits) of the greedy continuation after `length` prompt tokens.

    The ids end with the stop token when one was chosen; `steps[t]` is the [vocab]
    distribution `ids[t]` was chosen from.
    """
    ids: list[int] = []
    steps = [logits]
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        ids.append(token)
        if token in engine.stop_token_ids or step == max_new_tokens - 1:
            break
        logits, _ = engine._forward(cache, torch.tensor([token]), torch.tensor([length]), length + 1)
        length += 1
        steps.append(logits)
    return ids, steps


@torch.inference_mode()
def teacher_forced_logits(engine, cache, first: torch.Tensor, length: int, forced: list[int]) -> torch.Tensor:
    """[len(forced), vocab] next-token logits along `forced` (step 0 is `first`, the prefill's)."""
    if len(forced) <= 1:
        return first[None]
    inner = engine.model.model
    captured: list[torch.Tensor] = []
    hook = inner.layers[-1].register_forward_hook(
        lambda _mod, _inp, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        n = len(forced) - 1
        engine._forward(cache, torch.tensor(forced[:n]), torch.arange(length, length + n), length + n)
    finally:
        hook.remove()
    later = engine.model.lm_head(inner.norm(captured[-1]))[0].float().cpu()  # [n, vocab]
    return torch.cat([first[None], later])


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of [.., vocab] logits, in nats."""
    ref_log = torch.log_softmax(reference.double(), dim=-1)
    other_log = torch.log_softmax(other.double(), dim=-1)
    return (ref_log.exp() * (ref_log - other_log)).sum(-1)
