"""Generate the Python stubs from protos/ and check the contracts.

    python -m devtools.protos generate   # rewrite gen/python (stubs, Envoy descriptor set)
    python -m devtools.protos check      # fail if gen/python differs from protos/
    python -m devtools.protos lint       # buf lint (STANDARD)
    python -m devtools.protos breaking   # buf breaking (FILE) of every commit against its parent

buf cannot fetch googleapis from the Buf Schema Registry here, so buf reads a
descriptor-set image that protoc builds with the .proto files shipped in
googleapis-common-protos; only files under servemesh/ are linted.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen" / "python"
BIN = Path(sys.executable).parent
DESCRIPTORS = Path("servemesh") / "api.binpb"
ERROR_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def _includes() -> list[str]:
    site = sysconfig.get_paths()["purelib"]
    return [f"-I{site}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}"]


def _sources(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def _protoc(args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", *_includes(), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed:\n{proc.stderr}")


def generate(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plugin = f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}"
    _protoc(
        [
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            plugin,
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *_sources(PROTOS),
        ],
        cwd=PROTOS,
    )
    # The descriptor set Envoy's gRPC-JSON transcoder reads: every servemesh service, and the
    # google.rpc error details, without which it cannot render an error as a JSON body.
    # Shipped beside the stubs, so it can never drift either.
    _protoc(
        ["--include_imports", f"--descriptor_set_out={out / DESCRIPTORS}", *_sources(PROTOS), *ERROR_PROTOS],
        cwd=PROTOS,
    )


def image(protos: Path, out: Path) -> Path:
    target = out / "image.binpb"
    _protoc(
        ["--include_imports", "--include_source_info", f"--descriptor_set_out={target}", *_sources(protos)],
        cwd=protos,
    )
    return target


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "python"
        generate(fresh)
        diff = _tree_diff(fresh, GEN)
    if diff:
        print("gen/python is out of date with protos/ (run `python -m devtools.protos generate`):")
        print("\n".join(f"  {d}" for d in diff))
        return 1
    print("gen/python matches protos/")
    return 0


def _tree_diff(a: Path, b: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        if not root.exists():
            return set()
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    fa, fb = files(a), files(b)
    out = [f"missing: {f}" for f in sorted(fa - fb)] + [f"extra: {f}" for f in sorted(fb - fa)]
    out += [f"differs: {f}" for f in sorted(fa & fb) if not filecmp.cmp(a / f, b / f, shallow=False)]
    return out


def _buf(args: list[str]) -> int:
    return subprocess.run([str(BIN / "buf"), *args], cwd=ROOT).returncode


def lint() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        img = image(PROTOS, Path(tmp))
        return _buf(["lint", str(img), "--path", "servemesh", "--config", str(ROOT / "buf.yaml")])


def breaking() -> int:
    """Check the work tree against HEAD, then each commit that touched protos/ against its parent."""
    log = subprocess.run(
        ["git", "log", "--format=%H", "--", "protos"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()  # empty before the first commit
    pairs: list[tuple[str | None, str]] = [(None, "HEAD")] + [(c, f"{c}~1") for c in log]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (new, old) in enumerate(pairs):
            work = Path(tmp) / str(i)
            new_dir = PROTOS if new is None else _export(new, work / "new")
            old_dir = _export(old, work / "old")
            if new_dir is None or old_dir is None:
                continue  # no protos on one side: nothing to break
            (work / "img").mkdir(parents=True)
            new_img = image(new_dir, work / "img")
            old_img = image(old_dir, old_dir.parent)
            rc = _buf(
                [
                    "breaking",
                    str(new_img),
                    "--against",
                    str(old_img),
                    "--path",
                    "servemesh",
                    "--config",
                    str(ROOT / "buf.yaml"),
                ]
            )
            label = "work tree" if new is None else new[:12]
            print(f"buf breaking: {label} against {old}: {'ok' if rc == 0 else 'BREAKING'}")
            failed |= rc
    return 1 if failed else 0


def _export(rev: str, dest: Path) -> Path | None:
    """Write protos/ as of `rev` into dest/protos; None when that revision has none."""
    exists = (
        subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    if not exists:
        return None
    files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "--", "protos"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not files:
        return None
    for name in files:
        blob = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, check=True).stdout
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return dest / "protos"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.protos")
    parser.add_argument("command", choices=["generate", "check", "lint", "breaking"])
    cmd = parser.parse_args().command
    if cmd == "generate":
        generate(GEN)
        print(f"wrote {GEN.relative_to(ROOT)}")
        return 0
    return {"check": check, "lint": lint, "breaking": breaking}[cmd]()


if __name__ == "__main__":
    sys.exit(main())
