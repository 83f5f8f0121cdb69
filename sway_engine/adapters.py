"""Read and validate a PEFT LoRA adapter directory without loading a model.

Safetensors only (no pickle). Every failure names the file or tensor and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sway_engine.errors import AdapterError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    sha256: str
    size_bytes: int
    num_tensors: int

    @property
    def sha8(self) -> str:
        return self.sha256[:8]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """Hash of the adapter weights file (the adapter's content identity)."""
    return file_sha256(path / WEIGHTS)


def read_adapter(path: str | Path, *, check_finite: bool = True) -> AdapterInfo:
    """Parse the config, hash the weights and (by default) check every tensor is finite."""
    try:
        path = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte, ~nobody
        raise AdapterError(f"adapter path {path} cannot be resolved ({exc}); fix the path") from exc
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path} is missing: not a PEFT adapter directory")
    if not w_path.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{path} holds adapter_model.bin; sway loads safetensors only. "
                "Re-save the adapter with save_pretrained(safe_serialization=True)."
            )
        raise AdapterError(
            f"{w_path} is missing: the adapter has no weights (still being written?)"
        )
    cfg = _read_config(cfg_path)
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type} is not supported (LoRA only)")
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: DoRA adapters are not supported yet (use_dora: true)")
    rank = _whole(cfg_path, "r", cfg.get("r"))
    alpha = _number(cfg_path, "lora_alpha", cfg.get("lora_alpha", rank))
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(
            f"{cfg_path}: target_modules must be a list of module names, got {targets!r}"
        )
    num = _check_tensors(w_path) if check_finite else 0
    return AdapterInfo(
        path=path,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(str(t) for t in targets)),
        base_model=str(cfg.get("base_model_name_or_path") or ""),
        sha256=weights_sha256(path),
        size_bytes=w_path.stat().st_size,
        num_tensors=num,
    )


def _read_config(cfg_path: Path) -> dict[str, Any]:
    """The config as a JSON object; anything else is an AdapterError naming the file."""
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not UTF-8 text ({exc.reason}): re-export it") from exc
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: an int over 4300 digits
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(
            f"{cfg_path} must hold a JSON object (PEFT's LoraConfig), got {type(cfg).__name__}"
        )
    return cfg


def _whole(cfg_path: Path, field: str, value: Any) -> int:
    """A positive whole number (a rank of 4.7 is not 4: it is a broken config)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{cfg_path}: {field} must be a positive whole number, got {value!r}")
    if value <= 0:
        raise AdapterError(f"{cfg_path}: rank r must be positive, got {value!r}")
    return int(value)


def _number(cfg_path: Path, field: str, value: Any) -> float:
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
        if math.isfinite(number):
            return number
    raise AdapterError(f"{cfg_path}: {field} must be a finite number, got {value!r}")


def _check_tensors(w_path: Path) -> int:
    tensors = _load_fp32(w_path)
    if not tensors:
        raise AdapterError(f"{w_path} holds no tensors")
    for name, arr in tensors.items():
        if not np.all(np.isfinite(arr)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise AdapterError(
                f"{w_path}: tensor {name} has {bad} non-finite value(s); "
                "the adapter is corrupt (retrain or re-export it)"
            )
    return len(tensors)


def _load_fp32(w_path: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays: through numpy, and through torch (when present)
    for the dtypes numpy lacks (bf16, fp8). torch is not imported for an fp32 or fp16 file:
    it costs more than the check."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file as load_np

    try:
        try:
            return {k: v.astype(np.float32) for k, v in load_np(str(w_path)).items()}
        except (TypeError, AttributeError) as numpy_lacks:
            try:
                from safetensors.torch import load_file as load_torch
            except ImportError:
                raise numpy_lacks from None
            return {k: v.float().numpy() for k, v in load_torch(str(w_path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(
            f"{w_path} is not a readable safetensors file (truncated?): {exc}"
        ) from exc
    except (TypeError, AttributeError) as exc:  # numpy has no bf16 or fp8 dtype
        raise AdapterError(
            f"{w_path} holds a dtype numpy cannot read ({exc}); install torch "
            "(pip install 'sway[hf]') to check this adapter"
        ) from exc


# ---- adapter keys: `<slug(dir name)>-<sha8>`, one per (directory, weights content) ----

_NOT_SLUG = re.compile(r"[^a-z0-9_]+")
_SHA8 = re.compile(r"[0-9a-f]{8}")


def slug(name: str) -> str:
    """Lowercase `name`, turn every run of chars outside [a-z0-9_] into one '-', trim '-'."""
    return _NOT_SLUG.sub("-", name.lower()).strip("-")


def partition_key(name: str, sha256: str) -> str:
    """`<slug(name)>-<sha8>`: safe for Dagster keys, UI backfills and run keys."""
    base, sha8 = slug(name), sha256[:8].lower()
    if not base:
        raise ValueError(f"adapter name {name!r} has no letters or digits to build a key from")
    if not _SHA8.fullmatch(sha8):
        raise ValueError(f"{sha256!r} is not a hex sha256 digest")
    return f"{base}-{sha8}"


def split_key(key: str) -> tuple[str, str]:
    """(slug, sha8) of a partition key built by `partition_key`."""
    base, sep, sha8 = key.rpartition("-")
    if not (sep and base and _SHA8.fullmatch(sha8)):
        raise ValueError(f"{key!r} is not an adapter partition key (<slug>-<sha8>)")
    return base, sha8
