"""End to end through LlamaIndex + FAISS on SmolLM2: reuse, oracle, concurrency, reopen."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import torch
from epic_rag.app.index import open_index
from epic_rag.app.prompts import NOT_IN_DOCUMENTS
from epic_rag.integrations.llama_index import EpicLLM, current_handoff, last_call
from epic_rag.integrations.llama_index.handoff import KV_KEY, Handoff, llm_text, set_handoff
from epic_rag.integrations.llama_index.matching import plan_layout
from llama_index.core.schema import MetadataMode

from epic_rag import EpicEngine, KVStore
from epic_rag.layout import Kind

from .conftest import smollm2_over

pytestmark = pytest.mark.slow
QUESTION = "How long does the Skylark S3 battery last?"
MAX_NEW = 24


@pytest.fixture(scope="module")
def index_dir(sample_index, tmp_path_factory) -> Path:
    """A copy of the session's sample index: these tests store prompt prefixes and delete KV."""
    folder = tmp_path_factory.mktemp("rag_index") / "docs-index"
    shutil.copytree(sample_index, folder)
    return folder


@pytest.fixture(scope="module")
def app(index_dir, smollm2):
    return open_index(index_dir, engine=smollm2_over(smollm2, KVStore(index_dir / "kv")), max_new_tokens=MAX_NEW)


def plain_greedy(engine: EpicEngine, prompt: str, add_special_tokens: bool, max_new_tokens: int) -> tuple[str, int]:
    """(answer, prompt tokens) of HF's own greedy generation over the whole prompt: no reuse at all."""
    ids = torch.tensor([engine.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]])
    with torch.inference_mode():
        out = engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids.shape[1]


def attnlink_recomputed(layout, k: int) -> int:
    """Tokens AttnLink(k) recomputes: the first k of every linked chunk and every token outside
    the prefix and the chunks."""
    return sum(
        min(k, s.token_ids.numel()) if s.kind is Kind.CHUNK else s.token_ids.numel()
        for s in layout.segments
        if s.kind is not Kind.PREFIX
    )


def _source_texts(response) -> list[str]:
    return [llm_text(n.node) for n in response.source_nodes]


def test_answer_and_one_hit_per_node_on_second_query(app):
    first, _ = app.ask(QUESTION)
    assert "19 months" in str(first)  # skylark_s3.md: "On a full charge it runs for 19 months without sun"
    second, handoff = app.ask("What does the Skylark S3 cost?")
    assert "14,500 euros" in str(second)  # "The list price of one Skylark S3 is 14,500 euros."
    [call] = handoff.calls
    assert call.chunks_matched == len(second.source_nodes) == 3
    assert (handoff.hits, handoff.misses) == (call.store_hits, call.store_misses) == (4, 0)  # prefix + 3 chunks
    assert handoff.keys == [n.node.metadata[KV_KEY] for n in second.source_nodes]
    assert call.policy == "attnlink:16" and call.tokens_reused + call.tokens_recomputed == call.tokens_total


def test_full_recompute_matches_plain_generation(app):
    nodes = list(app.index.docstore.docs.values())[:3]
    texts = [llm_text(n) for n in nodes]
    engine = app.engine
    # chunks joined by "\n\n" (compact) and by "\n" (simple text between chunks)
    context = texts[0] + "\n\n" + texts[1] + "\n" + texts[2]
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Context:\n{context}\n---\nQuestion: {QUESTION}\nAnswer: "}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected, _ = plain_greedy(engine, prompt, False, 20)

    set_handoff(Handoff(chunks=texts))
    try:
        full = EpicLLM(engine, policy="full", max_new_tokens=20).complete(prompt, formatted=True)
        assert last_call().chunks_matched == 3 and last_call().tokens_reused == 0
        linked = EpicLLM(engine, policy="attnlink:16", max_new_tokens=20).complete(prompt, formatted=True)
        linked_call = last_call()
    finally:
        set_handoff(None)
    assert full.text.strip() == expected.strip()
    # the linked answer is the engine's own on the layout matching finds (formatted: special tokens added)
    plan = plan_layout(engine, prompt, texts, add_special_tokens=True)
    assert plan.chunks_matched == linked_call.chunks_matched == 3 and linked_call.tokens_total == plan.layout.length
    assert linked_call.tokens_recomputed == attnlink_recomputed(plan.layout, 16)
    assert linked.text == engine.generate_layout(plan.layout, "attnlink:16", max_new_tokens=20).text


# SmolLM2's greedy answers (deterministic): a change means the prompt or the linked cache changed.
# Refine and tree_summarize see fewer chunks or a summary per call, and SmolLM2 then loses the fact.
MODE_ANSWERS = {
    "compact": "The Skylark S3 battery lasts for 19 months before a full replacement.",
    "simple_summarize": "The Skylark S3 battery lasts for 19 months without sun.",
    "refine": "The document does not provide a specific answer to this question.",
    "tree_summarize": "The Skylark S3 battery lasts for 1.4 years.",
}


@pytest.mark.parametrize("mode", list(MODE_ANSWERS))
def test_response_modes(app, mode):
    response, handoff = app.ask(QUESTION, response_mode=mode)
    assert str(response) == MODE_ANSWERS[mode]
    assert handoff.calls, "the LLM was not called through the handoff"
    for call in handoff.calls:
        # every chunk entry was stored at indexing: only a prompt prefix seen for the first time can miss
        linked = call.chunks_matched + (call.chunks_matched > 0)  # the prompt head is linked when a chunk is
        assert call.store_hits + call.store_misses == linked and call.store_misses <= 1
        assert call.tokens_reused + call.tokens_recomputed == call.tokens_total
        if call.chunks_matched == 0:
            assert call.tokens_reused == 0
    if mode in ("compact", "tree_summarize"):
        assert handoff.calls[0].chunks_matched == len(response.source_nodes)
    if mode == "refine":
        assert handoff.calls[0].chunks_matched == 1


def test_answers_are_asked_to_say_when_the_documents_lack_them(app):
    prompts = app.query_engine().get_prompts()
    assert NOT_IN_DOCUMENTS in prompts["response_synthesizer:text_qa_template"].get_template()
    messages = app.chat_engine()._get_response_synthesizer([])._text_qa_template.message_templates
    assert NOT_IN_DOCUMENTS in messages[0].content


def _chat_totals(app, history_tokens: int, turns: int = 3) -> list[int]:
    """Prompt tokens of each turn when the same question is asked `turns` times in one chat."""
    chat, totals = app.chat_engine(history_tokens=history_tokens), []
    for _ in range(turns):
        set_handoff(None)
        chat.chat(QUESTION)
        [call] = current_handoff().calls
        assert call.chunks_matched == 3
        totals.append(call.tokens_total)
    return totals


def test_chat_history_stays_within_its_token_bound(app):
    none = _chat_totals(app, history_tokens=1)
    assert none[0] == none[1] == none[2]  # no earlier turn fits: none in the prompt
    bounded, unbounded = _chat_totals(app, history_tokens=40), _chat_totals(app, history_tokens=10_000)
    template = 12  # role markers around the kept messages
    assert bounded[0] == unbounded[0] == none[0]
    assert bounded[2] - bounded[0] <= 40 + template < unbounded[2] - unbounded[0]


def test_condensing_chat_retrieves_on_the_standalone_question(app):
    chat = app.chat_engine(retrieval="condense")
    set_handoff(None)
    chat.chat("What does the Skylark S3 cost?")
    assert chat.condense_call is None and chat.condensed == "What does the Skylark S3 cost?"
    set_handoff(None)
    chat.chat("And how much does it weigh?")
    handoff = current_handoff()
    assert chat.condense_call is not None and chat.condense_call.chunks_handed == 0
    assert chat.condensed and handoff.query == chat.condensed
    assert [c.chunks_matched for c in handoff.calls] == [3]  # the condense call is not counted as this answer's
    with pytest.raises(ValueError, match="unknown chat retrieval"):
        app.chat_engine(retrieval="everything")


def test_without_postprocessor_is_plain_generation(app):
    box = []

    def run() -> None:  # a fresh thread: no handoff in its context
        text = app.llm.complete("Say hello.").text
        box.append((text, last_call(), current_handoff()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    text, call, handoff = box[0]
    llm = app.llm
    system = [{"role": "system", "content": llm.system_prompt}] if llm.system_prompt else []
    prompt = app.engine.tokenizer.apply_chat_template(
        [*system, {"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    expected, n_prompt = plain_greedy(app.engine, prompt, False, MAX_NEW)
    assert text == expected and handoff is None
    assert call.chunks_handed == 0 and call.tokens_reused == 0 and call.tokens_recomputed == call.tokens_total
    assert call.tokens_total == n_prompt


QUESTIONS = ("What does the warranty cover?", "What did firmware 4.2 add?")


def test_two_threads_never_see_each_others_chunks(app):
    results: dict[str, tuple] = {}

    def ask(question: str) -> None:
        response, handoff = app.ask(question)
        results[question] = (response, handoff)

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for question in QUESTIONS:
        response, handoff = results[question]
        assert handoff.query == question
        assert handoff.chunks == _source_texts(response)
        assert handoff.calls[0].chunks_matched == len(handoff.chunks)
    assert results[QUESTIONS[0]][1] is not results[QUESTIONS[1]][1]


def test_two_asyncio_tasks_never_see_each_others_chunks(app):
    engine = app.query_engine()

    async def ask(question: str):
        response = await engine.aquery(question)
        return response, current_handoff()

    async def both():
        return await asyncio.gather(*(ask(q) for q in QUESTIONS))

    for question, (response, handoff) in zip(QUESTIONS, asyncio.run(both()), strict=True):
        assert handoff.query == question
        assert handoff.chunks == _source_texts(response)
        assert handoff.calls and handoff.calls[0].chunks_matched == len(handoff.chunks)


def test_reopened_index_recomputes_no_kv(app, index_dir):
    app.ask(QUESTION)  # the prompt prefix is stored on first use
    engine = EpicEngine(app.engine.model, app.engine.tokenizer, KVStore(index_dir / "kv"))
    reopened = open_index(index_dir, engine=engine, max_new_tokens=MAX_NEW)
    response, handoff = reopened.ask(QUESTION)
    assert str(response) == str(app.ask(QUESTION)[0])  # the same weights and KV: the same answer
    assert handoff.misses == 0 and handoff.hits == len(response.source_nodes) + 1  # and the prefix
    assert engine.store.stats().misses == 0


def test_a_lost_entry_is_computed_and_counted_as_a_miss(app):
    response, _ = app.ask(QUESTION)
    node = response.source_nodes[1].node
    assert app.engine.store.delete(node.metadata[KV_KEY])
    again, handoff = app.ask(QUESTION)
    assert str(again).strip() == str(response).strip()
    assert handoff.misses == 1 and handoff.hits == len(again.source_nodes)  # prefix + the two others


def test_precompute_keys_are_hidden_from_llm_and_embedder(app):
    for node in list(app.index.docstore.docs.values())[:5]:
        key = node.metadata[KV_KEY]
        assert key == app.engine.key_of(app.engine.chunk_token_ids(llm_text(node)))
        assert key not in llm_text(node) and key not in node.get_content(metadata_mode=MetadataMode.EMBED)


def test_index_built_with_another_model_is_refused(index_dir):
    with pytest.raises(ValueError, match="was built with model"):
        open_index(index_dir, model="qwen2.5-coder-0.5b-instruct")
