"""Greedy decoding from a prefilled prompt, teacher forcing, and KL against a reference.

Both extend exactly the cache a method linked (`EpicEngine.extend`), so a method's
answer and its distributions come from that cache and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .decode import sample_tokens
from .offline import cache_dir
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


def greedy_decode(engine, prefilled, prompt_length: int, max_new_tokens: int):
    """(token ids, per-step logits) of the greedy continuation of a prefilled prompt.

    The ids end with the stop token when one was chosen; `steps[t]` is the [vocab]
    distribution `ids[t]` was chosen from.
    """
    ids: list[int] = []
    steps: list[torch.Tensor] = []

    def extend(token: int) -> torch.Tensor:  # `token` is ids[-1]: it goes right after the ones before it
        return engine.extend(prefilled, [token], at=prompt_length + len(ids) - 1)[-1]

    for token, logits in sample_tokens(prefilled.logits, extend, SamplingParams(max_new_tokens=max_new_tokens)):
        ids.append(token)
        steps.append(logits)
        if token in engine.stop_token_ids:
            break
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


def against_reference(engine, prefilled, prompt_length: int, max_new_tokens: int, reference: dict):
    """(greedy ids, first-token KL, mean teacher-forced KL) of a prefilled prompt against a
    reference answer {"ids", "steps": [n, vocab] logits it was chosen from}."""
    forced = teacher_forced_logits(engine, prefilled, prompt_length, reference["ids"])
    ids, _ = greedy_decode(engine, prefilled, prompt_length, max_new_tokens)
    first = float(kl_divergence(reference["steps"][0], prefilled.logits))
    return ids, first, float(kl_divergence(reference["steps"], forced).mean())


class ReferenceCache:
    """Full recompute's greedy answer ({"ids", "steps", "answer"}) per prompt, kept on disk.

    A method added to a finished benchmark is compared with the same reference without
    paying full prefill again (75 s per 2WikiMQA record here). Keyed by a hash of the
    model fingerprint, the prompt's token ids and the answer length; safetensors files."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or cache_dir() / "bench-references"

    def key(self, engine, token_ids: torch.Tensor, max_new_tokens: int) -> str:
        digest = hashlib.sha256(f"{engine.fingerprint}|{max_new_tokens}|".encode())
        digest.update(token_ids.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    def load(self, key: str) -> dict | None:
        path = self.folder / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(path, "pt") as f:
                answer = f.metadata()["answer"]
                return {"ids": f.get_tensor("ids").tolist(), "steps": f.get_tensor("steps"), "answer": answer}
        except Exception as err:  # a damaged file is recomputed and replaced
            logger.warning("reference %s unreadable (%s); recomputing it", path, err)
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, reference: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{key}.tmp"
        tensors = {"ids": torch.tensor(reference["ids"], dtype=torch.int64), "steps": reference["steps"].contiguous()}
        save_file(tensors, tmp, metadata={"answer": reference["answer"]})
        os.replace(tmp, self.folder / f"{key}.safetensors")
