"""`epic-rag index | ask | chat | calibrate`: the RAG application on the command line.

Registered through the ``epic_rag.cli`` entry-point group. This module imports only the
standard library and torch-free parts of epic_rag: LlamaIndex, torch and the model load
when a command runs, and a missing extra is named with the pip command that adds it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from epic_rag.cli import argparse_type, require_extra
from epic_rag.compile_spec import CompileMode
from epic_rag.devices import device_name, dtype_name
from epic_rag.offline import DEFAULT_MODEL, check_model_spec
from epic_rag.policy_spec import CANDIDATES, parse_spec

from .settings import CHAT_RETRIEVAL, DEFAULT_CHUNKING, HISTORY_TOKENS

if TYPE_CHECKING:
    from .manifest import IndexManifest

RESPONSE_MODES = ("compact", "simple_summarize", "refine", "tree_summarize")
KV_URL_ENV = "EPIC_RAG_KV_URL"  # keeps a Redis password out of the process list
MAX_QUESTION_TOKENS = 1024  # one request cannot take minutes and gigabytes by accident


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add index, ask, chat and calibrate; each one's arguments are added when it is named."""
    subparsers.add_parser(
        "index",
        help="build a FAISS index and KV store from a documents folder, or update one with what changed",
        configure=_index_args,
    )
    subparsers.add_parser(
        "prune", help="delete the chunk KV files no node of an index references", configure=_prune_args
    )
    subparsers.add_parser("ask", help="answer one question from an index", configure=_ask_args)
    subparsers.add_parser("chat", help="interactive chat over an index", configure=_chat_args)
    subparsers.add_parser(
        "calibrate",
        help="measure recompute policies on an index's own chunks and record the best in it",
        configure=_calibrate_args,
    )


def _index_args(index: argparse.ArgumentParser) -> None:
    index.add_argument("docs_dir", metavar="DOCS_DIR", help="folder of documents (.txt, .md, .pdf, .docx, .html)")
    index.add_argument(
        "--index",
        required=True,
        metavar="INDEX_DIR",
        help="folder to write the index to; an index already there is updated with the documents added, changed "
        "and removed since, and the options it was built with are kept unless given",
    )
    index.add_argument(
        "--rebuild", action="store_true", help="build the index again from every document, even if one is there"
    )
    index.add_argument(
        "--model",
        type=model_arg,
        default=None,
        help=f"model name, folder or .gguf (default: the existing index's, else {DEFAULT_MODEL})",
    )
    sizes = {
        "target_tokens": "chunk size KVSplit aims for",
        "max_tokens": "hard maximum chunk size",
        "min_tokens": "minimum chunk size unless a document is shorter",
    }
    for field, what in sizes.items():
        flag = "--" + field.replace("_", "-")
        index.add_argument(flag, type=int, default=None, help=f"{what} (default {DEFAULT_CHUNKING[field]})")
    index.add_argument(
        "--compile",
        type=compile_arg,
        default=None,
        metavar="MODE",
        help="compile each chunk's KV alone, after the chunk before it in its document (neighbour), or after "
        "the N chunks most similar to it (similar:N); default: the model's measured default (alone for the "
        "built-in models); see docs/methods.md",
    )
    index.add_argument(
        "--strict", action="store_true", help="refuse the folder if a file cannot be read (default: skip it)"
    )
    index.add_argument(
        "--vector-store",
        default=None,
        metavar="chroma://HOST:PORT/COLLECTION",
        help="keep nodes and vectors in a Chroma server's collection (replaced by this build), for replicas "
        "on several machines (default: FAISS files in the index folder)",
    )
    index.add_argument(
        "--calibrate",
        action="store_true",
        help="then measure the candidate policies on the new index against full recompute and record the best "
        "(as `epic-rag calibrate` does)",
    )
    index.add_argument("--calibrate-samples", type=int, default=12, metavar="N", help="questions for --calibrate")
    add_kv_args(index)
    add_device_args(index, index_decides=False)
    index.set_defaults(func=_index)


def _ask_args(p: argparse.ArgumentParser) -> None:
    _question_args(p, "ask")


def _chat_args(p: argparse.ArgumentParser) -> None:
    _question_args(p, "chat")


def _question_args(p: argparse.ArgumentParser, name: str) -> None:
    if name == "ask":
        p.add_argument("question", help="the question")
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index built by `epic-rag index`")
    p.add_argument(
        "--policy",
        type=policy_arg,
        default=None,
        help="recompute policy, e.g. attnlink:16, guided:16, full, reuse, cacheblend:0.15 (default: the one "
        "`epic-rag calibrate` recorded for the index, else the model's default, shown by `epic-rag info`)",
    )
    add_ttft_target(p)
    p.add_argument(
        "--model", type=model_arg, default=None, help="must be the model that built the index (default: that one)"
    )
    p.add_argument("--top-k", type=int, default=3, help="chunks to retrieve (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument(
        "--max-question-tokens",
        type=int,
        default=MAX_QUESTION_TOKENS,
        help=f"refuse longer questions before any work (default {MAX_QUESTION_TOKENS})",
    )
    if name == "ask":
        p.add_argument("--response-mode", default="compact", choices=RESPONSE_MODES)
    else:
        p.add_argument(
            "--retrieval",
            choices=CHAT_RETRIEVAL,
            default="latest",
            help="retrieve on the latest message (default) or on a standalone question the model "
            "condenses from the history first (one more model call per follow-up)",
        )
        p.add_argument(
            "--history-tokens",
            type=int,
            default=HISTORY_TOKENS,
            help=f"earlier turns kept in the prompt, in tokens; older ones are dropped (default {HISTORY_TOKENS})",
        )
    add_kv_args(p)
    add_device_args(p)
    p.set_defaults(func=_ask if name == "ask" else _chat)


def add_device_args(p: argparse.ArgumentParser, index_decides: bool = True) -> None:
    """--device and --dtype (checked without torch)."""
    p.add_argument(
        "--device",
        type=argparse_type(device_name),
        default=None,
        help="cpu, cuda, cuda:N or mps (default: the best present: CUDA, then MPS, then the CPU)",
    )
    default = "the dtype the index was built in" if index_decides else "bfloat16 on CUDA, float32 elsewhere"
    p.add_argument(
        "--dtype",
        type=argparse_type(dtype_name),
        default=None,
        help=f"float32, bfloat16 or float16 (default: {default})",
    )


def add_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-url",
        default=os.environ.get(KV_URL_ENV) or None,
        metavar="redis://[user:password@]host:port/db",
        help=f"a Redis server shared by replicas as a chunk KV tier under the index's kv/ folder (default: "
        f"${KV_URL_ENV}; none). `index` writes every chunk there and needs it up; the others read and write "
        "it, and keep answering (computing) while it is down",
    )
    p.add_argument(
        "--kv-ttl", type=int, default=None, metavar="SECONDS", help="expire Redis entries this long after last use"
    )
    if p.prog.split()[-1] != "index":
        p.add_argument(
            "--kv-memory-mb",
            type=int,
            default=2048,
            metavar="MB",
            help="size of the in-process chunk KV tier (default 2048; 0: read every chunk from disk or Redis)",
        )
        p.add_argument(
            "--kv-disk-mb",
            type=int,
            default=None,
            metavar="MB",
            help="most the index's kv/ folder may hold; least recently used entries are deleted first (default: "
            "no limit)",
        )
        p.add_argument(
            "--no-local-kv",
            dest="local_kv",
            action="store_false",
            help="do not use the index's kv/ folder: chunk KV only in memory and Redis (needs --kv-url)",
        )


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index built by `epic-rag index`")
    p.add_argument("--samples", type=int, default=12, help="questions to sample from the index (default 12)")
    p.add_argument(
        "--policies",
        type=lambda s: [policy_arg(x) for x in s.split(",") if x.strip()],
        default=list(CANDIDATES),
        help=f"candidates, comma-separated (default {','.join(CANDIDATES)})",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens compared per sample")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_index
    from .manifest import read_manifest

    manifest = read_manifest(args.index)  # fail on a bad index folder before loading any model
    scores, best = calibrate_index(
        args.index,
        samples=args.samples,
        candidates=args.policies,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        manifest=manifest,
        device=args.device,
        dtype=args.dtype,
    )
    _print_calibration(scores, best, args.index)
    return 0


def _print_calibration(scores: list, best: str, index: str) -> None:
    from epic_rag.calibration import format_scores

    from .manifest import MANIFEST

    print(format_scores(scores, best))
    print(f"\nrecommended: {best} (recorded in {index}/{MANIFEST}; ask, chat and open_index now use it)")


def model_arg(spec: str) -> str:
    """argparse type: a model that does not exist is refused before anything loads."""
    try:
        check_model_spec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def compile_name(spec: str) -> str:
    """A compile mode in its canonical spelling ('similar' -> 'similar:5')."""
    return str(CompileMode.parse(spec))


compile_arg = argparse_type(compile_name)  # argparse type of --compile


def add_ttft_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ttft-target",
        type=ttft_target_arg,
        default=None,
        metavar="SECONDS|Nx",
        help="spend a time-to-first-token target instead of a fixed policy: seconds (e.g. 2.5) or a multiple of "
        "reuse's (e.g. 3x); full recompute (exact) when it fits, else the most chunk-head tokens that fit "
        "(the budget policy; not with --policy)",
    )


def ttft_target_arg(text: str) -> str:
    """argparse type: a TTFT target, checked as the budget policy it becomes."""
    return policy_arg(f"budget:{text.strip()}")


def chosen_policy(args: argparse.Namespace) -> str | None:
    """--policy, or the budget policy of --ttft-target (giving both is an error), or None."""
    target = getattr(args, "ttft_target", None)
    if target is not None and args.policy is not None:
        raise ValueError("give --policy or --ttft-target, not both: a TTFT target chooses the policy")
    return target or args.policy


def policy_arg(spec: str) -> str:
    """argparse type: a bad policy is refused before anything loads (the spec, checked)."""
    try:
        parse_spec(spec)
        return spec.strip()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _index(args: argparse.Namespace) -> int:
    require_extra("index", "llama-index", "llama_index.core", "faiss", "sentence_transformers")
    from .documents import read_documents

    report = read_documents(args.docs_dir, strict=args.strict, progress=True)  # before loading any model
    start = time.perf_counter()
    manifest, why = _existing_index(args)
    if manifest is not None and why is None:
        app = _update_index(args, manifest, report, start)
    else:
        if manifest is not None:
            print(f"rebuilding {args.index}: {why}")
        app = _build_index(args, manifest, report, start)
    if args.calibrate:
        from .calibrate import calibrate_index
        from .manifest import read_manifest

        scores, best = calibrate_index(
            args.index, samples=args.calibrate_samples, engine=app.engine, manifest=read_manifest(args.index)
        )
        _print_calibration(scores, best, args.index)
    return 0


def _existing_index(args: argparse.Namespace) -> tuple[IndexManifest | None, str | None]:
    """(the manifest of the index in --index, or None; why it must be rebuilt, or None to update it)."""
    from .manifest import MANIFEST, read_manifest

    if not (Path(args.index) / MANIFEST).is_file():
        return None, None
    try:
        manifest = read_manifest(args.index)
    except ValueError as err:
        raise ValueError(f"{err}; or pass --rebuild to replace it") from None
    built_dtype = manifest.dtype or "float32"
    checks = [
        (args.rebuild, "--rebuild"),
        (args.model not in (None, manifest.model), f"the model changed ({manifest.model} -> {args.model})"),
        (
            args.compile is not None and str(CompileMode.parse(args.compile)) != manifest.compile,
            f"the compile mode changed ({manifest.compile} -> {args.compile})",
        ),
        (any(manifest.chunking.get(k) != v for k, v in _given_chunking(args).items()), "the chunk sizes changed"),
        (
            args.dtype is not None and dtype_name(args.dtype) != built_dtype,
            f"the dtype changed ({built_dtype} -> {args.dtype})",
        ),
        (args.vector_store not in (None, manifest.vector_store), "the vector store changed"),
        (not manifest.document_hashes, "it was built before epic-rag kept per-document hashes"),
    ]
    return manifest, next((why for changed, why in checks if changed), None)


def _given_chunking(args: argparse.Namespace) -> dict[str, int]:
    """The KVSplit sizes given on the command line."""
    given = {"target_tokens": args.target_tokens, "max_tokens": args.max_tokens, "min_tokens": args.min_tokens}
    return {k: v for k, v in given.items() if v is not None}


def _chunking(args: argparse.Namespace, manifest: IndexManifest | None) -> dict[str, int]:
    """KVSplit sizes: those given, else the existing index's, else the defaults."""
    return {**DEFAULT_CHUNKING, **(manifest.chunking if manifest is not None else {}), **_given_chunking(args)}


def _build_index(args: argparse.Namespace, old: IndexManifest | None, report, start: float):
    from .index import build_index
    from .manifest import read_manifest

    model = args.model or (old.model if old is not None else DEFAULT_MODEL)
    app = build_index(
        args.docs_dir,
        args.index,
        model=model,
        parser_kwargs=_chunking(args, old),
        documents=report,
        compile=args.compile or (old.compile if old is not None and not args.model else None),
        kv_url=args.kv_url,
        kv_ttl_s=args.kv_ttl,
        vector_store=args.vector_store or (old.vector_store if old is not None else None),
        device=args.device,
        dtype=args.dtype or (old.dtype if old is not None and not args.model else None),
    )
    manifest = read_manifest(args.index)
    print(report.summary())
    print(
        f"indexed {manifest.nodes} chunks from {args.docs_dir} into {args.index} "
        f"with {model} ({manifest.dtype or 'float32'} on {app.engine.device}, compile {manifest.compile}) in "
        f"{time.perf_counter() - start:.1f} s; KV store: {_kv_tiers(app)}"
    )
    return app


def _update_index(args: argparse.Namespace, manifest: IndexManifest, report, start: float):
    from .index import open_index
    from .updating import DocumentChanges, UpdateReport

    changes = DocumentChanges.between(manifest.document_hashes, report.documents, complete=True)
    if not changes and not args.calibrate:  # nothing to do: the model need not even load
        print(report.summary())
        print(UpdateReport(0, 0, 0, len(changes.unchanged)).summary())
        print(f"{args.index} is up to date (generation {manifest.generation})")
        return None
    app = open_index(
        args.index, manifest=manifest, kv_url=args.kv_url, kv_ttl_s=args.kv_ttl, device=args.device, dtype=args.dtype
    )
    update = app.refresh(args.docs_dir, documents=report, show_progress=True)
    print(report.summary())
    print(update.summary())
    generation = manifest.generation + (1 if update.added or update.changed or update.removed else 0)
    print(
        f"updated {args.index} in {time.perf_counter() - start:.1f} s (generation {generation}); "
        f"{update.kv_deleted} unused KV files deleted ({update.bytes_freed / 2**20:.1f} MiB); "
        f"KV store: {_kv_tiers(app)}"
    )
    return app


def _kv_tiers(app) -> str:
    """Entries and MiB of each persistent KV tier of `app`'s store."""
    store = app.engine.store
    return ", ".join(
        f"{t.name} {t.entries} entries, {t.bytes / 2**20:.1f} MiB"
        for b, t in zip(store.backends, store.stats().tiers, strict=True)
        if b.persistent
    )


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index built by `epic-rag index`")
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    require_extra("prune", "llama-index", "llama_index.core", "faiss", "sentence_transformers")
    from .manifest import read_manifest
    from .updating import prune_index

    manifest = read_manifest(args.index)
    deleted, freed, kept = prune_index(args.index, manifest)
    print(
        f"pruned {args.index}: {deleted} KV files no node references deleted ({freed / 2**20:.1f} MiB freed), "
        f"{kept} kept"
    )
    return 0


class QuestionTooLong(ValueError):
    """A question over the CLI's limit or the model's window."""


def _question_limit(args: argparse.Namespace, manifest: IndexManifest):
    """A check of one question's length, ready before the model loads (only its tokenizer)."""
    from transformers import AutoConfig

    from epic_rag.model import load_tokenizer, resolve_model_folder

    model = args.model or manifest.model
    tokenizer = load_tokenizer(model)
    window = int(AutoConfig.from_pretrained(resolve_model_folder(model)).max_position_embeddings)

    def check(question: str) -> None:
        n = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        if n > window - args.max_new_tokens:
            raise QuestionTooLong(
                f"the question is {n} tokens; the model's window is {window} tokens with {args.max_new_tokens} kept "
                "for the answer: shorten it"
            )
        if n > args.max_question_tokens:
            raise QuestionTooLong(
                f"the question is {n} tokens, over the limit of {args.max_question_tokens}: shorten it, or raise "
                "--max-question-tokens"
            )

    return check


def open_app(args: argparse.Namespace, manifest: IndexManifest | None = None, engine=None):
    """The RagApp of `--index` as the command's arguments ask for it (`manifest`: the index's,
    when the command has read it already; each command reads it once; `engine`: one already
    loaded, as when a server reopens an updated index)."""
    require_extra(args.command, "llama-index", "llama_index.core", "faiss", "sentence_transformers")
    from .index import open_index
    from .manifest import read_manifest

    manifest = manifest or read_manifest(args.index)  # fail on a bad index folder before loading any model
    if not args.local_kv and not args.kv_url:
        raise ValueError("--no-local-kv leaves chunk KV nowhere to persist: give --kv-url too, or drop it")
    if args.kv_memory_mb < 0:
        raise ValueError(f"--kv-memory-mb must be 0 or more, got {args.kv_memory_mb}")
    if args.kv_disk_mb is not None and args.kv_disk_mb <= 0:
        raise ValueError(f"--kv-disk-mb must be more than 0, got {args.kv_disk_mb}")
    return open_index(
        args.index,
        model=args.model,
        policy=chosen_policy(args),
        max_new_tokens=getattr(args, "max_new_tokens", 256),
        top_k=args.top_k,
        kv_url=args.kv_url,
        kv_ttl_s=args.kv_ttl,
        kv_memory_bytes=args.kv_memory_mb << 20,
        kv_disk_bytes=args.kv_disk_mb << 20 if args.kv_disk_mb is not None else None,
        local_kv=args.local_kv,
        manifest=manifest,
        device=args.device,
        dtype=args.dtype,
        engine=engine,
    )


def _ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("the question is empty")
    from .manifest import read_manifest

    manifest = read_manifest(args.index)
    _question_limit(args, manifest)(args.question)  # before the model loads
    app = open_app(args, manifest)
    from epic_rag.integrations.llama_index.handoff import current_handoff

    from .report import format_report

    response = app.query_engine(response_mode=args.response_mode).query(args.question)
    print(str(response).strip())
    print()
    print(format_report(response.source_nodes, current_handoff()))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .manifest import read_manifest

    manifest = read_manifest(args.index)
    check = _question_limit(args, manifest)
    app = open_app(args, manifest)
    from .chat import chat_loop

    chat = app.chat_engine(retrieval=args.retrieval, history_tokens=args.history_tokens)
    print("epic-rag chat: ask about the indexed documents. /reset clears the conversation; /quit, /exit, Ctrl-D leave.")
    chat_loop(chat, check)
    return 0
