"""The `epic-rag index / ask / chat` commands as subprocesses on the sample folder."""

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
MODEL = "smollm2-135m-instruct"


def epic_rag(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "epic_rag.cli", *args], input=stdin, capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "idx"
    done = epic_rag("index", str(SAMPLES), "--index", str(path), "--model", MODEL)
    assert done.returncode == 0, done.stderr
    assert "indexed" in done.stdout and (path / "kv").is_dir() and (path / "storage").is_dir()
    return path


def test_ask_answers_with_sources_and_stats(index_dir):
    done = epic_rag(
        "ask", "How long does the Skylark S3 battery last?", "--index", str(index_dir), "--max-new-tokens", "32"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "sources: skylark_s3.md" in out
    assert "ttft:" in out and "cache hits: 3," in out and "recomputed tokens:" in out and "chunks linked: 3" in out
    assert out.split("sources:")[0].strip()


def test_chat_streams_resets_and_quits(index_dir):
    done = epic_rag(
        "chat",
        "--index",
        str(index_dir),
        "--max-new-tokens",
        "16",
        stdin="What does the Skylark S3 cost?\n/reset\n/quit\n",
    )
    assert done.returncode == 0, done.stderr
    assert "bot> " in done.stdout and "sources: " in done.stdout and "ttft:" in done.stdout
    assert "(conversation cleared)" in done.stdout


def test_clear_errors(tmp_path, index_dir):
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
    other = epic_rag("ask", "Anything?", "--index", str(index_dir), "--model", "qwen2.5-coder-0.5b-instruct")
    assert other.returncode == 2 and "was built with model" in other.stderr
    noindex = epic_rag("ask", "Anything?", "--index", str(tmp_path / "empty"))
    assert noindex.returncode == 2 and "not an epic-rag index" in noindex.stderr


def test_calibrate_records_a_policy_that_ask_then_uses(index_dir, tmp_path):
    index = tmp_path / "calibrated"
    shutil.copytree(index_dir, index)  # the other tests keep the uncalibrated index
    done = epic_rag(
        "calibrate", "--index", str(index), "--samples", "2", "--policies", "reuse,full", "--max-new-tokens", "4"
    )
    assert done.returncode == 0, done.stderr
    assert "| reuse |" in done.stdout and "| full (recommended) |" in done.stdout  # full is 0 KL from itself
    manifest = json.loads((index / "epic_rag_index.json").read_text())
    assert manifest["policy"] == "full" and [s["policy"] for s in manifest["calibration"]["scores"]] == [
        "reuse",
        "full",
    ]
    asked = epic_rag("ask", "What does the Skylark S3 cost?", "--index", str(index), "--max-new-tokens", "8")
    assert asked.returncode == 0, asked.stderr
    assert "policy: full" in asked.stdout
    told = epic_rag("ask", "What does it cost?", "--index", str(index), "--max-new-tokens", "4", "--policy", "reuse")
    assert "policy: reuse" in told.stdout


def test_a_bad_policy_is_refused_before_the_model_loads(index_dir):
    done = epic_rag("ask", "Anything?", "--index", str(index_dir), "--policy", "fastest")
    assert done.returncode == 2 and "unknown policy 'fastest'" in done.stderr


def test_a_model_that_does_not_exist_is_refused_before_anything_loads(tmp_path, index_dir):
    for command in (["index", str(SAMPLES), "--index", str(tmp_path / "i")], ["ask", "Hi?", "--index", str(index_dir)]):
        done = epic_rag(*command, "--model", "qwen-nonexistent-7b")
        assert done.returncode == 2 and "unknown model 'qwen-nonexistent-7b'" in done.stderr
        assert "smollm2-135m-instruct" in done.stderr and "rebuild" not in done.stderr
    assert not (tmp_path / "i").exists()


def test_an_overlong_question_is_refused_before_the_model_loads(index_dir):
    question = "Why? " * 600
    done = epic_rag("ask", question, "--index", str(index_dir), "--max-question-tokens", "500")
    assert done.returncode == 2 and "over the limit of 500" in done.stderr and "--max-question-tokens" in done.stderr
    assert "Loading weights" not in done.stderr  # refused on the tokenizer alone
    chat = epic_rag("chat", "--index", str(index_dir), "--max-question-tokens", "500", stdin=f"{question}\n/exit\n")
    assert chat.returncode == 0 and "(not asked: the question is" in chat.stdout and "bot> " not in chat.stdout


def test_ctrl_c_during_indexing_keeps_a_consistent_folder(tmp_path):
    import signal
    import time

    docs = tmp_path / "docs"
    docs.mkdir()
    for page in sorted((Path(__file__).resolve().parents[1] / "examples" / "stdlib_docs").glob("*.txt"))[:6]:
        shutil.copy(page, docs)  # enough chunks that indexing is still running when interrupted
    index = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "epic_rag.cli", "index", str(docs), "--index", str(index), "--model", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
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
    # a new process resolves the neighbour-compiled entries from the keys in the nodes' metadata
    asked = epic_rag("ask", "What does base64.b64encode return?", "--index", str(index), "--max-new-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    hits, misses = (int(x) for x in re.search(r"cache hits: (\d+), misses: (\d+)", asked.stdout).groups())
    assert hits >= 3 and misses <= 1  # only the first-seen prompt prefix may miss


def test_the_example_chatbot_rebuilds_when_the_documents_change_and_quits(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLES, docs)
    script = Path(__file__).resolve().parents[1] / "examples" / "rag_chatbot.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def chatbot(stdin: str) -> subprocess.CompletedProcess:
        args = [sys.executable, str(script), "--docs", str(docs), "--index", str(tmp_path / "idx"), "--model", MODEL]
        return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, timeout=600)

    first = chatbot("/quit\n")
    assert first.returncode == 0, first.stderr
    assert "indexing" in first.stdout and "bot>" not in first.stdout  # /quit is not a question
    same = chatbot("")  # Ctrl-D at the prompt
    assert same.returncode == 0 and "indexing" not in same.stdout and "Traceback" not in same.stderr
    (docs / "extra.md").write_text("The harbour office closes at noon on Fridays.\n")
    changed = chatbot("/exit\n")
    assert changed.returncode == 0 and "indexing" in changed.stdout
    manifest = json.loads((tmp_path / "idx" / "epic_rag_index.json").read_text())
    assert manifest["documents"] == len(list(SAMPLES.iterdir())) + 1
