"""The accuracy harness end to end on generated LongBench-format records with SmolLM2, plus its pieces."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from epic_rag_bench import accuracy
from epic_rag_bench.accuracy import QUESTION_TEMPLATE, SYSTEM, context_budget
from epic_rag_bench.needle import fitting_lengths
from epic_rag_bench.records import NEEDLE, NEEDLE_QUESTION, fit_chunks, make_chunker, needle_records, split_passages
from epic_rag_bench.scoring import best_over_golds, exact_match, token_f1

from epic_rag.agreement import greedy_decode, kl_divergence, teacher_forced_logits
from epic_rag.cli import main as cli_main

from .conftest import ROOT, SAMPLE_DOCS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_NEW, MAX_CONTEXT = 12, 500
RECORDS = [  # (id, question, gold answers, the sample documents whose paragraphs are its passages)
    ("norrvik-staff", "How many people does Norrvik Instruments employ?", ["142"], ["company.md", "skylark_s3.md"]),
    ("skylark-price", "What is the list price of one Skylark S3?", ["14,500 euros"], ["support.md", "skylark_s3.md"]),
]


def longbench_file(folder: Path) -> Path:
    """Two records in LongBench's jsonl format (`input`, `context` of "Passage N:" units, `answers`),
    their passages the paragraphs of the shipped sample documents."""
    path = folder / "longbench.jsonl"
    lines = []
    for record_id, question, answers, docs in RECORDS:
        paragraphs = [p for d in docs for p in (SAMPLE_DOCS / d).read_text().split("\n\n")[1:]]
        context = "".join(f"Passage {i}:\n{p.strip()}\n" for i, p in enumerate(paragraphs, 1))
        lines.append(json.dumps({"_id": record_id, "input": question, "context": context, "answers": answers}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(out: Path, *extra: str, methods: str = "full,attnlink:16") -> int:
    return cli_main(
        ["bench", "accuracy", "--data", str(longbench_file(out)), "--limit", "2", "--model", "smollm2-135m-instruct",
         "--methods", methods, "--max-context-tokens", str(MAX_CONTEXT), "--max-new-tokens", str(MAX_NEW),
         "--out", str(out / "bench"), "--reference-cache", str(out / "references"), *extra]
    )  # fmt: skip


def kl_rows(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of each row of logits, written out here."""
    p, q = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def by_hand(engine, question: str, context: str, methods: list[str]) -> dict:
    """What the harness should save for one record, recomputed apart from it: full recompute's
    answer by greedy decoding with the plain HF model, each method's answer from its own prefill
    and its distributions along full recompute's answer (teacher forced)."""
    chunks = fit_chunks(engine, split_passages(context), context_budget(engine, question, MAX_NEW, MAX_CONTEXT))
    layout = engine.layout(QUESTION_TEMPLATE.format(question=question), chunks, SYSTEM)
    answer, steps = [], []
    with torch.no_grad():
        while len(answer) < MAX_NEW and not (answer and answer[-1] in engine.stop_token_ids):
            ids = torch.cat([layout.ids, torch.tensor(answer, dtype=torch.int64)])
            steps.append(engine.model(input_ids=ids[None]).logits[0, -1])
            answer.append(int(steps[-1].argmax()))
    text = engine.tokenizer.decode([t for t in answer if t not in engine.stop_token_ids], skip_special_tokens=True)
    out = {"tokens": layout.length, "full": {"answer": text.strip()}}
    for method in methods:
        pre = engine.prefill(layout, method, extra_capacity=MAX_NEW + 1)
        forced = torch.cat([pre.logits[None], engine.extend(pre, answer[:-1], at=layout.length)])
        kl = kl_rows(torch.stack(steps), forced)
        own = engine.generate_layout(layout, method, max_new_tokens=MAX_NEW).text.strip()
        out[method] = {"answer": own, "kl_vs_full": float(kl[0]), "kl_tf_vs_full": float(kl.mean())}
        if method.startswith("attnlink:"):
            k = int(method.split(":")[1])  # every chunk follows the system prefix: all are displaced
            recomputed = sum(min(k, c.token_ids.numel()) for c in layout.chunks) + layout.question.token_ids.numel()
            out[method]["recomputed_fraction"] = recomputed / layout.length
    return out


@pytest.mark.slow
def test_harness_writes_json_table_and_plot_and_resumes(tmp_path, monkeypatch, smollm2):
    assert _run(tmp_path) == 0
    out = tmp_path / "bench"
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == "smollm2-135m-instruct" and result["records"] == 2
    assert list(result["methods"]) == ["full", "attnlink:16"]
    rows = [json.loads(line) for line in (tmp_path / "longbench.jsonl").read_text().splitlines()]
    want = {r["_id"]: by_hand(smollm2, r["input"], r["context"], ["attnlink:16", "reuse"]) for r in rows}
    saved = {r["id"]: r for r in (json.loads(p.read_text()) for p in (out / "records").glob("*.json"))}
    assert saved.keys() == want.keys()
    for record_id, record in saved.items():
        full, link, expected = record["methods"]["full"], record["methods"]["attnlink:16"], want[record_id]
        assert full["answer"] == expected["full"]["answer"] and full["tokens"] == link["tokens"] == expected["tokens"]
        assert link["answer"] == expected["attnlink:16"]["answer"]
        assert link["agree_vs_full"] == float(link["answer"] == full["answer"])
        assert link["recomputed_fraction"] == pytest.approx(expected["attnlink:16"]["recomputed_fraction"])
        for name in ("kl_vs_full", "kl_tf_vs_full"):
            assert link[name] == pytest.approx(expected["attnlink:16"][name], rel=1e-3, abs=1e-6)
    golds = {r["_id"]: r["answers"] for r in rows}
    summary = result["methods"]
    for method in ("full", "attnlink:16"):
        f1 = [best_over_golds(token_f1, want[i][method]["answer"], golds[i]) for i in want]
        assert summary[method]["f1"] == pytest.approx(statistics.fmean(f1))
    assert summary["full"]["recomputed_fraction"] == 1.0 and summary["full"]["kl_vs_full"] == 0.0
    assert result["mean_tokens"] == pytest.approx(statistics.fmean(w["tokens"] for w in want.values()))

    table = (out / "results.md").read_text().splitlines()
    lines = [line for line in table if line.startswith("| full") or line.startswith("| attnlink:16")]
    assert len(lines) == 2 and all(r.count("|") == 12 for r in lines)
    assert (out / "f1_vs_ttft.png").read_bytes()[:8] == PNG_MAGIC
    assert len(list((tmp_path / "references").glob("*.safetensors"))) == 2

    original = accuracy.evaluate_record

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished record was computed again")

    monkeypatch.setattr(accuracy, "evaluate_record", refuse)
    assert _run(tmp_path) == 0  # resumed: every record and method is cached
    assert json.loads((out / "results.json").read_text())["methods"] == result["methods"]

    monkeypatch.setattr(accuracy, "evaluate_record", original)
    real_result = accuracy._method_result

    def no_full_prefill(engine, layout, policy, record, max_new, reference):
        assert reference is not None, "full recompute ran again although its answer was kept"
        return real_result(engine, layout, policy, record, max_new, reference)

    monkeypatch.setattr(accuracy, "_method_result", no_full_prefill)
    assert _run(tmp_path, methods="full,attnlink:16,reuse") == 0  # an added method: compared with the kept one
    for record_id, record in (
        (r["id"], r) for r in (json.loads(p.read_text()) for p in (out / "records").glob("*.json"))
    ):
        reuse = record["methods"]["reuse"]
        assert reuse["answer"] == want[record_id]["reuse"]["answer"]
        assert reuse["kl_vs_full"] == pytest.approx(want[record_id]["reuse"]["kl_vs_full"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_harness_refuses_to_mix_settings_in_one_folder(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "settings.json").write_text(json.dumps({"model": "another"}))
    assert _run(tmp_path) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_teacher_forcing_matches_greedy_decoding(smollm2, essays):
    """Teacher forcing full recompute's own answer must give the distributions it decoded from."""
    chunks = [essays[0][:600], essays[1][:600]]
    layout = smollm2.layout("What is the first essay about?", chunks)
    pre = smollm2.prefill(layout, "full", extra_capacity=9)
    ids, steps = greedy_decode(smollm2, pre, layout.length, 6)
    forced = teacher_forced_logits(smollm2, pre, layout.length, ids)  # branches again from the prompt
    assert forced.shape == (len(ids), pre.logits.numel()) and len(ids) > 1
    assert kl_divergence(torch.stack(steps), forced).max() < 1e-4
    assert torch.equal(forced.argmax(-1), torch.tensor(ids))


def test_method_lists_expand_bare_numbers_into_the_previous_family():
    assert accuracy.parse_methods("full, attnlink:1,2,16,cacheblend:0.15,0.3,reuse") == [
        "full",
        "attnlink:1",
        "attnlink:2",
        "attnlink:16",
        "cacheblend:0.15",
        "cacheblend:0.3",
        "reuse",
    ]
    assert accuracy.parse_methods("full,reuse") == ["full", "reuse"]


def test_kl_divergence_is_zero_for_equal_and_the_textbook_value_for_different_logits():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    assert kl_divergence(a, a).item() == pytest.approx(0.0, abs=1e-12)
    z = math.exp(2) + 1 + math.exp(-1)
    p = [math.exp(2) / z, 1 / z, math.exp(-1) / z]
    against_uniform = sum(pi * math.log(pi * 3) for pi in p)  # KL(p || uniform over 3) = sum p log(p / (1/3))
    assert kl_divergence(a, torch.zeros(1, 3)).item() == pytest.approx(against_uniform, rel=1e-12)
    assert kl_divergence(torch.zeros(1, 3), a).item() == pytest.approx(sum(math.log(1 / 3 / pi) / 3 for pi in p))


def test_passages_are_split_at_their_labels():
    context = "Passage 1:\nAlpha one.\nPassage 2:\nBeta two.\n\nPassage 3:\nGamma."
    assert split_passages(context) == ["Passage 1:\nAlpha one.", "Passage 2:\nBeta two.", "Passage 3:\nGamma."]
    assert split_passages("no labels here") == ["no labels here"]
    assert split_passages("intro\nPassage 1: x") == ["intro", "Passage 1: x"]


@pytest.mark.slow
def test_fit_chunks_keeps_leading_chunks_within_the_budget(smollm2, essays):
    chunks = [essays[i][:800] for i in range(4)]
    sizes = [smollm2.chunk_token_ids(c).numel() for c in chunks]
    kept = fit_chunks(smollm2, chunks, sizes[0] + sizes[1] + 5)
    assert kept == chunks[:2]
    cut = fit_chunks(smollm2, chunks, 50)
    assert len(cut) == 1 and smollm2.chunk_token_ids(cut[0]).numel() <= 50


@pytest.mark.slow
def test_unknown_chunking_is_refused(smollm2):
    with pytest.raises(ValueError, match="unknown chunking"):
        make_chunker(smollm2, "sentences")


@pytest.mark.slow
def test_needle_records_place_the_needle_at_each_depth(smollm2, essay_folder):
    records = needle_records(smollm2, essay_folder, [1024], [0.0, 0.5, 1.0])
    assert [r.meta["depth"] for r in records] == [0.0, 0.5, 1.0]
    for r in records:
        text = " ".join(r.chunks)
        assert "Dolores Park" in text and all(len(smollm2.tokenize(c)) <= 512 for c in r.chunks)
    first, middle, last = (" ".join(r.chunks) for r in records)
    assert first.startswith(NEEDLE[:30]) and last.rstrip().endswith(NEEDLE[-30:])
    assert 0.3 < middle.index("Dolores Park") / len(middle) < 0.7


def test_summary_reports_medians_of_times_and_kl_and_means_of_scores():
    def row(f1, ttft, kl):
        return {"f1": f1, "rouge_l": f1, "ttft_s": ttft, "kv_load_s": 0.0, "link_s": 0.0, "recompute_s": ttft,
                "recomputed_fraction": 0.1, "kl_vs_full": kl, "kl_tf_vs_full": kl, "agree_vs_full": 1.0,
                "tokens": 100}  # fmt: skip

    full = [row(1.0, 10.0, 0.0), row(0.0, 30.0, 0.0), row(0.5, 20.0, 0.0)]
    fast = [row(1.0, 1.0, 0.1), row(0.0, 2.0, 0.2), row(0.0, 9.0, 3.0)]
    summary = accuracy.summarise({"full": full, "attnlink:16": fast})
    link = summary["attnlink:16"]
    assert link["n"] == 3 and link["ttft_s"] == 2.0 and link["f1"] == pytest.approx(1 / 3)
    assert link["kl_vs_full"] == pytest.approx(1.1) and link["kl_vs_full_median"] == 0.2
    assert link["speedup_vs_full"] == pytest.approx(10.0)


@pytest.mark.slow
def test_needle_lengths_are_lowered_to_what_the_model_takes(smollm2, essay_folder):
    budget = accuracy.context_budget(smollm2, NEEDLE_QUESTION, 32, None)
    assert budget < smollm2.max_context
    lengths = fitting_lengths(smollm2, [1024, smollm2.max_context], budget, 512)
    assert lengths[0] == 1024 and 1024 < lengths[1] < budget
    (last,) = needle_records(smollm2, essay_folder, lengths[1:], [1.0])
    assert sum(smollm2.chunk_token_ids(c).numel() for c in last.chunks) <= budget  # the needle at 100% stays in
    assert last.chunks[-1].rstrip().endswith(NEEDLE[-30:])
    with pytest.raises(ValueError, match="no haystack fits"):
        fitting_lengths(smollm2, [1024], 600, 512)


@pytest.mark.slow
def test_qa_bench_retrieves_from_a_folder_and_scores_every_method(tmp_path):
    questions = ROOT / "benchmarks" / "qa" / "sample_docs_questions.jsonl"

    def run(out, methods, *extra):
        return cli_main(
            ["bench", "qa", "--corpus", str(ROOT / "examples" / "sample_docs"), "--questions", str(questions),
             "--limit", "2", "--top-k", "3", "--model", "smollm2-135m-instruct", "--methods", methods,
             "--target-tokens", "64", "--max-tokens", "96", "--min-tokens", "16",
             "--max-new-tokens", "6", "--out", str(out), "--reference-cache", str(tmp_path / "references"), *extra]
        )  # fmt: skip

    assert run(tmp_path / "alone", "full,guided:16,reuse") == 0
    result = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert result["records"] == 2 and list(result["methods"]) == ["full", "guided:16", "reuse"]

    def saved(folder):
        return {r["id"]: r for r in (json.loads(p.read_text()) for p in (folder / "records").glob("*.json"))}

    records = saved(tmp_path / "alone")
    assert {r["question"] for r in records.values()} == {
        json.loads(line)["question"] for line in questions.read_text().splitlines()[:2]
    }
    golds = {json.loads(line)["question"]: json.loads(line)["answers"] for line in questions.read_text().splitlines()}
    for r in records.values():
        for method, row in r["methods"].items():  # the scores of the answer the harness saved
            assert row["exact"] == best_over_golds(exact_match, row["answer"], golds[r["question"]]), method
            assert row["f1"] == pytest.approx(best_over_golds(token_f1, row["answer"], golds[r["question"]])), method
        assert r["methods"]["guided:16"]["kl_vs_full"] > 0.0  # a linked cache is not full prefill's

    reuse_kl = {k: r["methods"]["reuse"]["kl_vs_full"] for k, r in records.items()}
    for mode in ("neighbour", "similar:2"):
        folder = tmp_path / mode.replace(":", "-")
        assert run(folder, "full,reuse", "--compile", mode) == 0
        assert json.loads((folder / "results.json").read_text())["compile"] == mode
        compiled = saved(folder)
        assert compiled.keys() == records.keys()
        for key, r in compiled.items():  # the same prompt tokens: the same reference answer
            assert r["methods"]["full"]["answer"] == records[key]["methods"]["full"]["answer"]
        kl = [(r["methods"]["reuse"]["kl_vs_full"], reuse_kl[k]) for k, r in compiled.items()]
        assert all(abs(a - b) > 1e-6 for a, b in kl), mode  # the chunks' KV saw other text first

    folders = [str(tmp_path / f) for f in ("alone", "neighbour", "similar-2")]
    assert (
        cli_main(
            ["bench", "frontier", *folders, "--order", str(questions), "--skip", "1", "--out", str(tmp_path / "fr")]
        )
        == 0
    )
    frontier = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert frontier["records"] == [json.loads(questions.read_text().splitlines()[1])["id"]]  # the second question
    points = {(p["compile"], p["method"]): p for p in frontier["points"]}
    assert set(points) == {
        ("alone", "guided:16"),
        *((m, c) for m in ("alone", "neighbour", "similar:2") for c in ("full", "reuse")),
    }
    assert points["alone", "reuse"]["kl_removed"] == 0.0 and points["alone", "full"]["kl_removed"] == 1.0
    assert points["alone", "full"]["frontier"]  # nothing beats full recompute's KL of 0
    assert (tmp_path / "fr" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_match_and_contained_answers_normalise():
    from epic_rag_bench.scoring import contains_answer, exact_match

    assert exact_match("The three years.", "three years") == 1.0
    assert exact_match("three-year warranty", "three years") == 0.0
    assert contains_answer("Every buoy has a three-year warranty.", "three-year") == 1.0
    assert contains_answer("It costs 14,500 euros.", "1,200 euros") == 0.0
    assert contains_answer("in 2011", "201") == 0.0  # whole words only


@pytest.mark.slow
def test_compile_cost_compiles_every_entry_each_mode_needs(tmp_path, capsys):
    """alone stores one entry per chunk (the sample docs make four); similar:2 also the plain
    entries it links and the prompt head, each computed in a fresh store, timed against alone."""
    argv = ["bench", "compile-cost", "--corpus", str(ROOT / "examples" / "sample_docs"), "--chunks", "4",
            "--model", "smollm2-135m-instruct", "--modes", "alone,similar:2", "--out", str(tmp_path)]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["compile"]: r for r in result["rows"]}
    assert result["chunks"] == 4 and rows["alone"]["entries"] == 4
    linked = rows["similar:2"]["chunks_linked"]
    assert 2 <= linked <= 4 and rows["similar:2"]["entries"] == 4 + 1 + linked  # + the prompt head
    assert rows["alone"]["vs_alone"] == 1.0
    assert rows["similar:2"]["vs_alone"] == rows["similar:2"]["seconds"] / rows["alone"]["seconds"]
    assert "| similar:2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_dtypes_bench_measures_every_dtype_against_float32s_full_prefill(tmp_path, essay_folder, capsys):
    out = tmp_path / "dtypes.json"
    argv = ["bench", "dtypes", "--model", "smollm2-135m-instruct", "--essays", str(essay_folder), "--chunks", "2",
            "--chunk-tokens", "64", "--repeats", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    rows = {(r["dtype"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 9 and rows["float32", "full"]["kl_vs_fp32_full"] == 0.0
    assert 0.0 < rows["bfloat16", "full"]["kl_vs_fp32_full"] < 0.05  # bf16 rounding only: small, never zero
    assert rows["float32", "reuse"]["kl_vs_fp32_full"] > 0.0
    assert "| bfloat16 | attnlink:16 |" in capsys.readouterr().out
