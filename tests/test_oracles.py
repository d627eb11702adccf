"""The specification: reuse paths must reproduce plain full prefill where they claim to."""

from __future__ import annotations

import pytest
import torch

from epic_rag import AttnLink, FullRecompute, FullReuse
from epic_rag.kv import rotate_keys

from .conftest import tiny_engine, tiny_model

CHUNKS = ["The first chunk talks about rivers.", "A second, shorter one.", "Third chunk: mountains and lakes!"]
QUESTION = "Which chunk mentions lakes?"


def plain_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(input_ids=ids[None]).logits[0, -1].float()


@pytest.mark.parametrize("system", [None, "You answer from the context."])
def test_full_recompute_equals_plain_forward(family, system):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, CHUNKS, system)
    reference = plain_logits(engine, layout.ids)
    for policy in (FullRecompute(), AttnLink(k=max(c.token_ids.numel() for c in layout.chunks))):
        logits = engine.prefill(layout, policy).logits
        assert (logits - reference).abs().max() < 1e-4, policy


def test_single_chunk_without_system_is_exact_under_attnlink(family):
    engine = tiny_engine(family, bos=False)
    layout = engine.layout(QUESTION, CHUNKS[:1])
    assert layout.chunks[0].start == 0
    result = engine.prefill(layout, AttnLink(16))
    assert result.stats.tokens_recomputed == layout.question.token_ids.numel()
    assert (result.logits - plain_logits(engine, layout.ids)).abs().max() < 1e-4


def test_reuse_really_reuses(family):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, CHUNKS, "sys")
    full = engine.prefill(layout, FullRecompute()).logits
    reuse = engine.prefill(layout, FullReuse()).logits
    assert (full - reuse).abs().max() > 1e-3


def keys_at(model, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer K and V of `ids` encoded alone with positions start.. (the HF model's own cache)."""
    positions = torch.arange(start, start + ids.numel())[None]
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=positions, use_cache=True)
    layers = out.past_key_values.layers
    return torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers])


ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048},
}


@pytest.mark.parametrize(
    "family, rope", [("llama", rope) for rope in sorted(ROPE_TYPES)] + [("qwen2", "default"), ("mistral", "default")]
)
@pytest.mark.parametrize("offset", [1, 37, 4000])
def test_rotated_keys_equal_keys_encoded_at_offset(family, rope, offset):
    model = tiny_model(family, rope_parameters=ROPE_TYPES[rope])
    inv_freq = model.model.rotary_emb.inv_freq
    ids = torch.randint(4, 120, (48,), generator=torch.Generator().manual_seed(1))
    k0, v0 = keys_at(model, ids, 0)  # [layers, kv_heads, n, head_dim]
    kp, vp = keys_at(model, ids, offset)
    moved = rotate_keys(k0, inv_freq, offset)
    # fp32 RoPE itself rounds offset * freq, so compare relative to the key norms
    scale = kp.abs().amax(dim=(-1, -2), keepdim=True)
    assert ((moved - kp).abs() / scale).max() < 1e-4
    assert ((v0 - vp).abs() / vp.abs().amax(dim=(-1, -2), keepdim=True)).max() < 1e-4


def test_rotation_matches_float64_reference():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    p = 4000
    angle = p * inv_freq  # [8]
    x1, x2 = keys[..., :8], keys[..., 8:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    assert torch.allclose(rotate_keys(keys, inv_freq, p), expected, atol=1e-12)
    back = rotate_keys(rotate_keys(keys, inv_freq, p), inv_freq, -p)
    assert torch.allclose(back, keys, atol=1e-12)


def test_eager_attention_is_exact_too():
    from epic_rag import EpicEngine

    from .conftest import CharTokenizer

    engine = EpicEngine(tiny_model("llama", attn_implementation="eager"), CharTokenizer())
    layout = engine.layout(QUESTION, CHUNKS, "sys")
    reference = plain_logits(engine, layout.ids)
    assert (engine.prefill(layout, FullRecompute()).logits - reference).abs().max() < 1e-4
    chunk = engine.encode(layout.chunks[0].token_ids)
    k0, _ = keys_at(engine.model, layout.chunks[0].token_ids, 0)
    assert (chunk.keys - k0).abs().max() < 1e-5


def test_linked_cache_holds_chunks_encoded_at_their_positions(family):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, CHUNKS, "a system prompt")
    cache = engine.prefill(layout, FullReuse()).cache
    for seg in layout.chunks:
        k, v = keys_at(engine.model, seg.token_ids, seg.start)  # the chunk alone, at its global positions
        linked_k = cache.keys[:, 0, :, seg.start : seg.end]
        linked_v = cache.values[:, 0, :, seg.start : seg.end]
        assert ((linked_k - k).abs() / k.abs().amax(dim=(-1, -2), keepdim=True)).max() < 1e-4
        assert ((linked_v - v).abs() / v.abs().amax(dim=(-1, -2), keepdim=True)).max() < 1e-4
