"""The `epic-rag index / ask / chat / calibrate` commands and the example chatbot as subprocesses on the
sample folder: their output, their errors, what they reuse, and how often they read the manifest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sample_docs"
CHATBOT = Path(__file__).resolve().parents[1] / "examples" / "rag_chatbot.py"
MODEL = "smollm2-135m-instruct"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BATTERY = "How long does the Skylark S3 battery last?"
# `epic-rag` with every opening of an index manifest counted (a Python audit hook sees each open)
COUNTING_MAIN = """
import sys
reads = []
def count(event, args):
    if event == "open" and str(args[0]).endswith("epic_rag_index.json"):
        reads.append(args[0])
sys.addaudithook(count)
from epic_rag.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print(f"manifest reads: {len(reads)}", file=sys.stderr)
sys.exit(code)
"""


def epic_rag(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", COUNTING_MAIN, *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=600
    )


def manifest_reads(done: subprocess.CompletedProcess) -> int:
    """How many times the command opened an index manifest (the count COUNTING_MAIN prints last)."""
    return int(re.search(r"^manifest reads: (\d+)$", done.stderr, re.MULTILINE).group(1))


def kv_keys(index: Path) -> set[str]:
    """The keys of the KV entries in an index's kv/ folder (one file per entry)."""
    return {p.stem for p in (index / "kv").glob("*/*.safetensors")}


def node_keys(index: Path) -> set[str]:
    """The chunk KV keys the index's nodes carry in their metadata (from the persisted docstore)."""
    docstore = json.loads((index / "storage" / "docstore.json").read_text())["docstore/data"]
    return {node["__data__"]["metadata"]["epic_rag_kv_key"] for node in docstore.values()}


def chunk_kv_only(index: Path, dest: Path) -> Path:
    """A copy of `index` whose kv/ holds its chunks' KV only, as `epic-rag index` leaves it (no
    prompt head cached by an earlier query)."""
    shutil.copytree(index, dest)
    chunks = node_keys(dest)
    for key in kv_keys(dest) - chunks:
        (dest / "kv" / key[:2] / f"{key}.safetensors").unlink()
    assert kv_keys(dest) == chunks and len(chunks) == 4  # the four sample documents are one chunk each
    return dest


def stats_line(out: str) -> str:
    """The reuse part of a ttft line: ``chunks: ... | prompt head: ...``."""
    return re.search(r"\| (chunks: .*? \| prompt heads?: [^|]*?) \|", out).group(1)


def test_ask_answers_and_counts_chunks_and_the_prompt_head_apart(sample_index, tmp_path):
    index = chunk_kv_only(sample_index, tmp_path / "idx")
    chunks = kv_keys(index)
    first = epic_rag("ask", BATTERY, "--index", str(index), "--max-new-tokens", "32")
    assert first.returncode == 0, first.stderr
    answer, report = first.stdout.split("\n\nsources: ")
    assert "19 months" in answer  # skylark_s3.md: "On a full charge it runs for 19 months without sun"
    sources = [s.split(" (")[0] for s in report.splitlines()[0].split(", ")]
    assert sources[0] == "skylark_s3.md" and len(sources) == 3  # top-k 3 of the 4 chunks
    # three chunks linked from the store; the prompt head was not in it: computed, then stored
    assert stats_line(first.stdout) == "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed"
    head = kv_keys(index) - chunks
    assert len(head) == 1
    assert manifest_reads(first) == 1
    again = epic_rag("ask", "What does the Skylark S3 cost?", "--index", str(index), "--max-new-tokens", "16")
    assert again.returncode == 0, again.stderr
    assert "14,500 euros" in again.stdout.split("\n\nsources: ")[0]
    assert stats_line(again.stdout) == "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"
    assert kv_keys(index) == chunks | head  # the second query computed nothing new


def test_chat_streams_resets_and_quits(sample_index):
    before = kv_keys(sample_index)
    done = epic_rag(
        "chat",
        "--index",
        str(sample_index),
        "--max-new-tokens",
        "16",
        stdin="What does the Skylark S3 cost?\n/reset\n/quit\n",
    )
    assert done.returncode == 0, done.stderr
    assert "bot> " in done.stdout and "sources: skylark_s3.md" in done.stdout
    head = "computed" if kv_keys(sample_index) - before else "cached"  # chat's head: stored by its first use
    assert stats_line(done.stdout) == f"chunks: 3 linked (3 hits, 0 misses) | prompt head: {head}"
    assert "(conversation cleared)" in done.stdout
    assert manifest_reads(done) == 1


def test_clear_errors(tmp_path, sample_index):
    missing = epic_rag("index", str(tmp_path / "nope"), "--index", str(tmp_path / "i"))
    assert missing.returncode == 2 and "documents folder not found" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = epic_rag("index", str(empty), "--index", str(tmp_path / "i"))
    assert done.returncode == 2 and "is empty" in done.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("Fine text.")
    (bad / "blob.bin").write_bytes(b"\xff\xfe\x00\x81 not text")
    done = epic_rag("index", str(bad), "--index", str(tmp_path / "i"), "--strict")
    assert done.returncode == 2 and "--strict: cannot read 1 file(s)" in done.stderr
    assert "blob.bin (not text" in done.stderr
    other = epic_rag("ask", "Anything?", "--index", str(sample_index), "--model", "qwen2.5-coder-0.5b-instruct")
    assert other.returncode == 2 and "was built with model" in other.stderr
    noindex = epic_rag("ask", "Anything?", "--index", str(tmp_path / "empty"))
    assert noindex.returncode == 2 and "not an epic-rag index" in noindex.stderr


def test_calibrate_records_a_policy_that_ask_then_uses(sample_index, tmp_path):
    index = tmp_path / "calibrated"
    shutil.copytree(sample_index, index)  # the other tests keep the uncalibrated index
    done = epic_rag(
        "calibrate", "--index", str(index), "--samples", "2", "--policies", "reuse,full", "--max-new-tokens", "4"
    )
    assert done.returncode == 0, done.stderr
    assert "| reuse |" in done.stdout and "| full (recommended) |" in done.stdout  # full is 0 KL from itself
    assert manifest_reads(done) == 1
    manifest = json.loads((index / "epic_rag_index.json").read_text())
    assert manifest["policy"] == "full" and [s["policy"] for s in manifest["calibration"]["scores"]] == [
        "reuse",
        "full",
    ]
    asked = epic_rag("ask", "What does the Skylark S3 cost?", "--index", str(index), "--max-new-tokens", "8")
    assert asked.returncode == 0, asked.stderr
    assert "policy: full" in asked.stdout
    assert stats_line(asked.stdout) == "chunks: 3 found, recomputed | prompt head: recomputed"  # full links nothing
    told = epic_rag("ask", "What does it cost?", "--index", str(index), "--max-new-tokens", "4", "--policy", "reuse")
    assert "policy: reuse" in told.stdout
    assert stats_line(told.stdout).startswith("chunks: 3 linked (3 hits, 0 misses) | prompt head: ")


def test_a_bad_policy_is_refused_before_the_model_loads(sample_index):
    done = epic_rag("ask", "Anything?", "--index", str(sample_index), "--policy", "fastest")
    assert done.returncode == 2 and "unknown policy 'fastest'" in done.stderr


def test_a_model_that_does_not_exist_is_refused_before_anything_loads(tmp_path, sample_index):
    index_command = ["index", str(SAMPLES), "--index", str(tmp_path / "i")]
    for command in (index_command, ["ask", "Hi?", "--index", str(sample_index)]):
        done = epic_rag(*command, "--model", "qwen-nonexistent-7b")
        error = next(line for line in done.stderr.splitlines() if "error:" in line)  # after argparse's usage
        assert done.returncode == 2 and "unknown model 'qwen-nonexistent-7b'" in error
        assert "smollm2-135m-instruct" in error and "rebuild" not in error
    assert not (tmp_path / "i").exists()


def test_an_overlong_question_is_refused_before_the_model_loads(sample_index):
    question = "Why? " * 600
    done = epic_rag("ask", question, "--index", str(sample_index), "--max-question-tokens", "500")
    assert done.returncode == 2 and "over the limit of 500" in done.stderr and "--max-question-tokens" in done.stderr
    assert "Loading weights" not in done.stderr  # refused on the tokenizer alone
    chat = epic_rag("chat", "--index", str(sample_index), "--max-question-tokens", "500", stdin=f"{question}\n/exit\n")
    assert chat.returncode == 0 and "(not asked: the question is" in chat.stdout and "bot> " not in chat.stdout


def test_ctrl_c_during_indexing_keeps_a_consistent_folder(tmp_path):
    import signal
    import time

    docs = tmp_path / "docs"
    docs.mkdir()
    for page in sorted((Path(__file__).resolve().parents[1] / "examples" / "stdlib_docs").glob("*.txt"))[:6]:
        shutil.copy(page, docs)  # enough chunks that indexing is still running when interrupted
    index = tmp_path / "idx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "epic_rag.cli", "index", str(docs), "--index", str(index), "--model", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        # a terminal's Ctrl-C, even when this test runs in a background job (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any((index / "kv").rglob("*.safetensors")):
        time.sleep(0.2)  # interrupt once chunk KV is being written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "epic-rag: interrupted; nothing half-written was kept"
    assert not list(index.rglob("*.part")) and not (index / "epic_rag_index.json").exists()
    assert not (index / "storage").exists()  # a half-built index is never left looking whole
    again = epic_rag("index", str(docs), "--index", str(index), "--model", MODEL, "--compile", "neighbour")
    assert again.returncode == 0, again.stderr
    manifest = json.loads((index / "epic_rag_index.json").read_text())
    assert manifest["documents"] == 6 and manifest["compile"] == "neighbour"
    said = (
        f"indexed {manifest['nodes']} chunks from {docs} into {index} with {MODEL} (float32 on cpu, compile neighbour)"
    )
    assert said in again.stdout
    assert node_keys(index) <= kv_keys(index) and manifest_reads(again) == 1
    # a new process resolves the neighbour-compiled entries from the keys in the nodes' metadata
    asked = epic_rag("ask", "What does base64.b64encode return?", "--index", str(index), "--max-new-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    assert stats_line(asked.stdout) == "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed"


def test_the_example_chatbot_updates_its_index_when_the_documents_change_and_quits(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLES, docs)

    def chatbot(stdin: str) -> subprocess.CompletedProcess:
        return run_chatbot("--docs", str(docs), "--index", str(tmp_path / "idx"), "--model", MODEL, stdin=stdin)

    first = chatbot("/quit\n")
    assert first.returncode == 0, first.stderr
    assert "indexing" in first.stdout and "bot>" not in first.stdout  # /quit is not a question
    same = chatbot("")  # Ctrl-D at the prompt
    assert same.returncode == 0 and "indexing" not in same.stdout and "Traceback" not in same.stderr
    (docs / "extra.md").write_text("The harbour office closes at noon on Fridays.\n")
    changed = chatbot("/exit\n")
    assert changed.returncode == 0 and "indexing" not in changed.stdout
    said = f"updating {tmp_path / 'idx'}: 1 added, 0 changed, 0 removed, 4 unchanged; 1 chunks compiled, 0 reused"
    assert said in changed.stdout
    manifest = json.loads((tmp_path / "idx" / "epic_rag_index.json").read_text())
    assert manifest["documents"] == len(list(SAMPLES.iterdir())) + 1 and manifest["generation"] == 2


def run_chatbot(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHATBOT), *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=600
    )


def test_the_example_chatbot_opens_an_index_and_keeps_the_conversation(sample_index, tmp_path):
    index = chunk_kv_only(sample_index, tmp_path / "idx")
    chunks = kv_keys(index)
    follow_up = "Repeat your previous answer."
    done = run_chatbot("--index", str(index), stdin=f"{BATTERY}\n{follow_up}\n/reset\n{follow_up}\n/quit\n")
    assert done.returncode == 0, done.stderr
    assert "indexing" not in done.stdout  # --index alone opens the index as it is
    answers = re.findall(r"bot> (.*)", done.stdout)
    assert len(answers) == 3 and "19 months" in answers[0]
    assert answers[1] == answers[0]  # the follow-up saw the first turn
    assert answers[2] != answers[0]  # after /reset the same follow-up has no earlier answer to repeat
    assert "(conversation cleared)" in done.stdout
    # each turn links the three retrieved chunks; the chat prompt head is computed once, then cached
    assert [stats_line(line) for line in done.stdout.splitlines() if line.startswith("ttft: ")] == [
        "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed",
        "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached",
        "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached",
    ]
    assert len(kv_keys(index) - chunks) == 1


def test_the_example_chatbot_refuses_a_folder_that_is_not_an_index(tmp_path):
    done = run_chatbot("--index", str(tmp_path), stdin="")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"rag_chatbot: error: {tmp_path} is not an epic-rag index (no epic_rag_index.json); build one with "
        "`epic-rag index`"
    )
