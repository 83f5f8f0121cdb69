"""PEFT LoRA adapter -> mlx-lm adapter (`adapters.safetensors` + `adapter_config.json`).

mlx-lm's `LoRALinear` computes `linear(x) + scale * (x @ lora_a) @ lora_b`, with lora_a of
shape (in, r) and lora_b (r, out): PEFT's A (r, in) and B (out, r) transposed, and one rank
and scale for every module. Conversions are cached by content (the source files' hash), so a
repeated run reuses the converted directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sway_engine.adapters import CONFIG, WEIGHTS, AdapterInfo, _load_fp32, read_adapter
from sway_engine.errors import AdapterError

MLX_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
# Bumped when the converted layout changes, so old cache entries are not reused.
CONVERTER_VERSION = 1
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\.(?P<rest>.+)$")
_USE_HF = "Evaluate it with the hf backend (models.*.kind: hf) instead."


@dataclass(frozen=True)
class Conversion:
    """A converted adapter directory and what it holds."""

    path: Path
    source: AdapterInfo
    rank: int
    scale: float
    modules: tuple[str, ...]
    num_tensors: int
    reused: bool


def is_mlx_adapter(path: str | Path) -> bool:
    """True when `path` already holds an mlx-lm adapter."""
    path = Path(path)
    return (path / MLX_WEIGHTS).is_file() and (path / MLX_CONFIG).is_file()


def default_cache_dir() -> Path:
    """$SWAY_CACHE_DIR/mlx-adapters, else $XDG_CACHE_HOME (or ~/.cache)/sway/mlx-adapters."""
    if os.environ.get("SWAY_CACHE_DIR"):
        return Path(os.environ["SWAY_CACHE_DIR"]) / "mlx-adapters"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sway" / "mlx-adapters"


def source_digest(info: AdapterInfo) -> str:
    """sha256 over the converter version, the PEFT config bytes and the weights' sha256."""
    h = hashlib.sha256(f"sway-mlx-convert-v{CONVERTER_VERSION}\0".encode())
    h.update((info.path / CONFIG).read_bytes())
    h.update(b"\0" + info.sha256.encode())
    return h.hexdigest()


def converted(src: str | Path, cache_dir: str | Path | None = None) -> Conversion:
    """The mlx-lm form of the PEFT adapter `src`, converted once into a content-addressed cache."""
    info = read_adapter(src)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = root / source_digest(info)[:32]
    if is_mlx_adapter(dst):
        return _describe(dst, info, reused=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        _convert(info, tmp)
        try:
            tmp.rename(dst)
        except OSError as exc:
            if not is_mlx_adapter(dst):  # else a concurrent conversion of the same files won
                raise AdapterError(
                    f"cannot place the converted adapter at {dst}: {exc}; remove that "
                    "directory or point SWAY_CACHE_DIR elsewhere"
                ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _describe(dst, info, reused=False)


def convert_peft_to_mlx(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Conversion:
    """Write the mlx-lm adapter for the PEFT adapter `src` into `dst`."""
    info = read_adapter(src)
    dst = Path(dst)
    if is_mlx_adapter(dst) and not overwrite:
        raise AdapterError(f"{dst} already holds an mlx-lm adapter; pass --overwrite to replace it")
    _convert(info, dst)
    return _describe(dst, info, reused=False)


def _convert(info: AdapterInfo, dst: Path) -> None:
    cfg_path = info.path / CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    check_peft_config(cfg, cfg_path)
    tensors = mlx_tensors(_load_fp32(info.path / WEIGHTS), info.path / WEIGHTS)
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    rslora = bool(cfg.get("use_rslora"))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    for module in modules:
        lora_a = tensors[f"{module}.lora_a"]
        if lora_a.shape[1] != rank:
            raise AdapterError(
                f"{info.path / WEIGHTS}: {module} has rank {lora_a.shape[1]}, config r is {rank}; "
                "the adapter's config and weights disagree"
            )
    config = {
        "fine_tune_type": "lora",
        # -1: every block gets LoRA layers (mlx-lm counts from the last block); blocks the
        # adapter does not touch keep lora_b = 0, an exact no-op.
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": 0.0,
            "keys": sorted({_relative_key(m) for m in modules}),
        },
        "sway": {
            "converter_version": CONVERTER_VERSION,
            "source": str(info.path),
            "source_sha256": info.sha256,
            "lora_alpha": alpha,
            "use_rslora": rslora,
        },
    }
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / MLX_WEIGHTS), metadata={"format": "mlx"})
    (dst / MLX_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_peft_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Reject what mlx-lm's LoRA cannot express, naming the field and what to do.

    (read_adapter has already rejected non-LoRA peft types and DoRA.)
    """
    init = cfg.get("init_lora_weights")
    if cfg.get("use_qalora") or cfg.get("loftq_config") or init == "loftq":
        raise AdapterError(
            f"{cfg_path}: a QLoRA/QA-LoRA/LoftQ adapter was trained against a quantized base; "
            f"mlx-lm would apply it to an unquantized base. {_USE_HF}"
        )
    _check_quantized_base(cfg, cfg_path)
    unsupported = {
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "trainable_token_indices": "trained token embeddings",
        "target_parameters": "LoRA on parameters (target_parameters)",
        "layer_replication": "layer replication",
    }
    for field, what in unsupported.items():
        if cfg.get(field):
            raise AdapterError(
                f"{cfg_path}: {field} is set; mlx-lm adapters hold one rank and scale for "
                f"plain LoRA factors only, so {what} cannot be converted. {_USE_HF}"
            )
    if str(cfg.get("bias", "none")) != "none" or cfg.get("lora_bias"):
        raise AdapterError(f"{cfg_path}: trained biases cannot be converted. {_USE_HF}")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(
            f"{cfg_path}: fan_in_fan_out (GPT-2 Conv1D layers) has no mlx-lm equivalent. {_USE_HF}"
        )
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    embeddings = [t for t in targets if "embed" in t or t == "wte"]
    if embeddings:
        raise AdapterError(
            f"{cfg_path}: LoRA on embedding layers ({', '.join(embeddings)}) is not "
            f"converted. {_USE_HF}"
        )


def mlx_tensors(tensors: dict[str, np.ndarray], w_path: Path) -> dict[str, np.ndarray]:
    """PEFT factor names -> mlx-lm parameter names, each factor transposed."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if "lora_embedding_" in name:
            raise AdapterError(f"{w_path}: {name} is an embedding LoRA factor. {_USE_HF}")
        match = _FACTOR.match(name)
        if match is None or not name.startswith(PEFT_PREFIX):
            raise AdapterError(
                f"{w_path}: tensor {name} is not a PEFT LoRA factor "
                f"({PEFT_PREFIX}<module>.lora_A/lora_B.weight); it cannot be converted. {_USE_HF}"
            )
        if value.ndim != 2:
            raise AdapterError(f"{w_path}: {name} has shape {value.shape}, expected a matrix")
        module = match["module"][len(PEFT_PREFIX) :]
        leaf = "lora_a" if match["which"] == "A" else "lora_b"
        out[f"{module}.{leaf}"] = np.ascontiguousarray(value.T, dtype=np.float32)
    if not out:
        raise AdapterError(f"{w_path} holds no LoRA factors")
    for module in {k.rsplit(".", 1)[0] for k in out}:
        a, b = out.get(f"{module}.lora_a"), out.get(f"{module}.lora_b")
        if a is None or b is None:
            raise AdapterError(f"{w_path}: {module} has only one of lora_A and lora_B")
        if a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{w_path}: {module} has lora_A rank {a.shape[1]} but lora_B rank {b.shape[0]}"
            )
    return out


def _relative_key(module: str) -> str:
    """mlx-lm's LoRA key: the path inside a block (`self_attn.q_proj`), else the full path."""
    match = _LAYER.search(module)
    return match["rest"] if match else module


def _check_quantized_base(cfg: dict[str, Any], cfg_path: Path) -> None:
    base = Path(str(cfg.get("base_model_name_or_path") or ""))
    base_cfg = base / "config.json"
    if not base_cfg.is_file():
        return
    try:
        quant = json.loads(base_cfg.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(quant, dict) and (
        quant.get("load_in_4bit") or quant.get("load_in_8bit") or quant.get("quant_method")
    ):
        raise AdapterError(
            f"{cfg_path}: its base {base} is quantized ({quant.get('quant_method', 'bnb')}); "
            f"a QLoRA adapter is not converted for an unquantized mlx-lm base. {_USE_HF}"
        )


def _describe(dst: Path, src: AdapterInfo, *, reused: bool) -> Conversion:
    cfg = json.loads((dst / MLX_CONFIG).read_text(encoding="utf-8"))
    params = cfg["lora_parameters"]
    from safetensors import safe_open

    with safe_open(str(dst / MLX_WEIGHTS), framework="numpy") as fh:
        keys = list(fh.keys())
    return Conversion(
        path=dst,
        source=src,
        rank=int(params["rank"]),
        scale=float(params["scale"]),
        modules=tuple(sorted({k.rsplit(".", 1)[0] for k in keys})),
        num_tensors=len(keys),
        reused=reused,
    )
