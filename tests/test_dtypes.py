"""The oracles in half precision, and on an accelerator when one is present.

bf16 and fp16 keep 8 and 11 significant bits: the unit roundoff u is 2^-8 and 2^-11. The
engine runs the model's own layers in the same dtype as the HF forward it is compared with,
so full recompute may differ from it only by the order of accumulation (a few u of the
logits' scale). A re-rotated key is rounded twice where a key encoded at its position is
rounded once (the key at position 0, then the rotation's products in the dtype), so they
agree to within a few u of the keys' norms. The bounds below are 4u, relative to the scale.
"""

from __future__ import annotations

import pytest
import torch

from epic_rag import AttnLink, EpicEngine, FullRecompute, FullReuse, fingerprint
from epic_rag.kv import rotate_keys

from .conftest import CharTokenizer, tiny_model
from .test_oracles import CHUNKS, QUESTION, keys_at

HALF = [torch.bfloat16, torch.float16]


def roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def engine_in(family: str, dtype: torch.dtype, device: str = "cpu") -> EpicEngine:
    return EpicEngine(tiny_model(family).to(device=device, dtype=dtype), CharTokenizer())


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None].to(model.device)).logits[0, -1].float().cpu()


@pytest.mark.parametrize("dtype", HALF)
def test_full_recompute_equals_the_hf_forward_in_half_precision(family, dtype):
    engine = engine_in(family, dtype)
    layout = engine.layout(QUESTION, CHUNKS, "You answer from the context.")
    reference = hf_logits(engine.model, layout.ids)
    bound = 4 * roundoff(dtype) * reference.abs().max()
    for policy in (FullRecompute(), AttnLink(k=max(c.token_ids.numel() for c in layout.chunks))):
        assert (engine.prefill(layout, policy).logits - reference).abs().max() <= bound, policy


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("offset", [37, 4000])
def test_rotated_half_keys_equal_keys_encoded_at_offset(family, dtype, offset):
    model = tiny_model(family).to(dtype)
    ids = torch.randint(4, 120, (48,), generator=torch.Generator().manual_seed(1))
    k0, _ = keys_at(model, ids, 0)  # [layers, kv_heads, n, head_dim] in dtype
    kp, _ = keys_at(model, ids, offset)
    moved = rotate_keys(k0, model.model.rotary_emb.inv_freq, offset)
    assert moved.dtype == dtype
    scale = kp.float().abs().amax(dim=(-1, -2), keepdim=True)
    assert ((moved.float() - kp.float()).abs() / scale).max() <= 4 * roundoff(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_entries_are_stored_and_linked_in_their_dtype(dtype):
    engine = engine_in("qwen2", dtype)
    (chunk_id,) = engine.add_chunks([CHUNKS[0]])
    entry = engine.store.get(chunk_id[3:])
    assert entry.keys.dtype == dtype and entry.keys.device.type == "cpu"
    layout = engine.layout(QUESTION, [chunk_id, CHUNKS[1]], "sys")
    cache = engine.prefill(layout, FullReuse()).cache
    first = layout.chunks[0]
    assert cache.keys.dtype == dtype
    moved = rotate_keys(entry.keys, engine.rotary.inv_freq, first.start)  # linked = the entry, re-rotated
    assert torch.equal(cache.keys[:, 0, :, first.start : first.end], moved)
    assert torch.equal(cache.values[:, 0, :, first.start : first.end], entry.values)


def accelerator() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return None


needs_accelerator = pytest.mark.skipif(accelerator() is None, reason="no CUDA or MPS device on this machine")


@pytest.mark.gpu
@needs_accelerator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_accelerator_full_recompute_equals_the_hf_forward(family, dtype):
    engine = engine_in(family, dtype, accelerator())
    layout = engine.layout(QUESTION, CHUNKS, "You answer from the context.")
    reference = hf_logits(engine.model, layout.ids)
    bound = 4 * roundoff(dtype) * reference.abs().max() if dtype != torch.float32 else 1e-4
    assert (engine.prefill(layout, FullRecompute()).logits - reference).abs().max() <= bound


@pytest.mark.gpu
@needs_accelerator
def test_on_the_accelerator_entries_live_on_the_cpu_and_link_on_the_device():
    engine = engine_in("llama", torch.float32, accelerator())
    chunk_ids = engine.add_chunks(CHUNKS)
    assert all(engine.store.get(c[3:]).keys.device.type == "cpu" for c in chunk_ids)
    layout = engine.layout(QUESTION, chunk_ids, "sys")
    cache = engine.prefill(layout, FullReuse()).cache
    assert cache.keys.device.type == accelerator()
    cpu = EpicEngine(tiny_model("llama"), CharTokenizer())
    on_cpu = cpu.prefill(cpu.layout(QUESTION, CHUNKS, "sys"), FullReuse()).cache
    assert torch.allclose(cache.keys.cpu(), on_cpu.keys, atol=1e-4)  # the same re-rotation on both


@pytest.mark.gpu
@needs_accelerator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fingerprint_is_the_same_on_the_accelerator(family, dtype):
    """A CPU-built index opens on the GPU: the weights' fingerprint does not depend on the device."""
    model = tiny_model(family).to(dtype)
    on_device = fingerprint(model.to(accelerator()))  # Module.to moves the model in place
    assert fingerprint(model.cpu()) == on_device
