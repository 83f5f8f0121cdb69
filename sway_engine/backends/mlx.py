"""mlx-lm backend: one base model, every view a set of LoRA weights swapped into its layers.

The base loads once. Each adapted module is an mlx-lm `LoRALinear`; a view is the triple
(lora_a, lora_b, scale) per module: the trained adapter, a scaled copy (scale * lam), a
seeded null from `sway_engine.nulls` (the same weights the hf backend builds), or the base
(rank-0 factors: an exact no-op). Rows are grouped by view; each group is batched with
right padding, which a causal mask makes exact. Divergences are exact over the vocabulary
(fp32 log-softmax, fp64 sums). PEFT adapters are converted to mlx-lm's format on first use.
The bookkeeping shared with the hf backend is `backends/local.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from sway_engine import nulls
from sway_engine.adapters import AdapterInfo, file_sha256
from sway_engine.backends.local import Derived, LocalBackend
from sway_engine.backends.rows import KLRow, Row
from sway_engine.convert import MLX_CONFIG, MLX_WEIGHTS, converted, is_mlx_adapter
from sway_engine.errors import AdapterError, BackendError
from sway_engine.requests import Generate, GenerationResult, ModuleWeights
from sway_engine.views import Base, Finetuned, Null, Scaled

BASE_KEY = Base().key


@dataclass(frozen=True)
class _Trained:
    """The loaded adapter: per module, PEFT-layout A (r, in), B (out, r) and its scale."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    scale: float
    rslora: bool


def _import_stack() -> tuple[Any, Any]:
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise BackendError(
            f"the mlx backend needs mlx and mlx-lm ({exc.name} is missing): pip install 'sway[mlx]'"
        ) from exc
    return mx, mlx_lm


class MLXBackend(LocalBackend):
    """Loads the base once with mlx-lm; views swap LoRA weights in place."""

    kind = "mlx"
    BASE_ROW = BASE_KEY

    def __init__(
        self,
        base: str,
        adapter: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        batch_tokens: int = 4096,
        max_batch_rows: int = 64,
        row_cache_bytes: int = 256 << 20,
        cache_dir: str | Path | None = None,
    ) -> None:
        mx, mlx_lm = _import_stack()
        self._mx = mx
        self.base_id = base
        self.cache_dir = cache_dir
        self._setup(
            batch_tokens=batch_tokens,
            max_batch_rows=max_batch_rows,
            row_cache_bytes=row_cache_bytes,
            extra_counters=("view_switches",),
        )
        self._device = _pick_device(mx, device)
        path = Path(base).expanduser()
        if not (path / "config.json").is_file():
            raise BackendError(
                f"cannot load base model {base!r}: the mlx backend loads local model "
                "directories (config.json + safetensors); download the model first"
            )
        try:
            model, wrapper = mlx_lm.load(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendError(f"cannot load base model {base!r} with mlx-lm: {exc}") from exc
        if dtype != "auto":
            model.set_dtype(_pick_dtype(mx, dtype))
        self._dtype_name = dtype
        model.eval()
        self._model = model
        self.tokenizer = wrapper._tokenizer
        self.tokenizer.model_max_length = 1 << 30  # rows.plan windows or cuts long texts
        self._eos = frozenset(int(i) for i in wrapper.eos_token_ids)
        pad = self.tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else next(iter(self._eos), 0))
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.max_len = int(config.get("max_position_embeddings") or 2048)
        self.vocab_size = int(model.args.vocab_size)
        self._trained: dict[str, _Trained] = {}
        self._lora: dict[str, Any] = {}
        self._views: dict[str, dict[str, tuple[Any, Any, float]]] = {}
        self._active = BASE_KEY
        self._base_weights: dict[str, np.ndarray] = {}  # module -> float32 W (AdapterWeights)
        if adapter is not None:
            self.load_adapter(str(adapter))

    # ---- adapters and views ----

    def _numerics(self) -> str:
        import mlx_lm

        versions = f"mlx={self._mx.__version__} mlx_lm={mlx_lm.__version__}"
        return f"{versions} dtype={self._dtype_name} device={self._device}"

    def _load_primary(self, path: str) -> AdapterInfo:
        """PEFT adapters are converted once, then cached."""
        info, trained = self._read(path)
        self._unwrap()
        self._trained = {}
        self._views = {}
        self._register("", info, trained)
        return info

    def _load_extra(self, path: str, label: str) -> AdapterInfo:
        info, trained = self._read(path)
        self._register(label, info, trained)
        return info

    def _register(self, label: str, info: AdapterInfo, trained: _Trained) -> None:
        self._wrap(trained, info.path)
        self._trained[label] = trained
        self._views[Finetuned(label).key] = {
            m: self._mlx_pair(trained.a[m], trained.b[m], trained.scale) for m in trained.a
        }
        self._active = ""
        self._use(BASE_KEY)

    def _read(self, path: str) -> tuple[AdapterInfo, _Trained]:
        """The adapter's identity and its factors (a PEFT adapter is converted first)."""
        src = Path(path).expanduser().resolve()
        if not src.is_dir():
            raise AdapterError(f"adapter directory {src} does not exist")
        if is_mlx_adapter(src) and not (src / "adapter_model.safetensors").exists():
            info, mlx_dir = _mlx_info(src), src
        else:
            conversion = converted(src, self.cache_dir)
            info, mlx_dir = conversion.source, conversion.path
        config = json.loads((mlx_dir / MLX_CONFIG).read_text(encoding="utf-8"))
        if config.get("fine_tune_type", "lora") != "lora":
            raise AdapterError(
                f"{mlx_dir / MLX_CONFIG}: fine_tune_type {config.get('fine_tune_type')!r} "
                "is not supported (LoRA only)"
            )
        params = config.get("lora_parameters") or {}
        if "scale" not in params:
            raise AdapterError(f"{mlx_dir / MLX_CONFIG}: lora_parameters.scale is missing")
        weights = self._mx.load(str(mlx_dir / MLX_WEIGHTS))
        rslora = bool((config.get("sway") or {}).get("use_rslora", False))
        return info, self._factors(weights, float(params["scale"]), rslora, mlx_dir)

    def _factors(
        self, weights: dict[str, Any], scale: float, rslora: bool, where: Path
    ) -> _Trained:
        mx = self._mx
        a: dict[str, np.ndarray] = {}
        b: dict[str, np.ndarray] = {}
        for name, value in weights.items():
            module, _, leaf = name.rpartition(".")
            arr = np.array(value.astype(mx.float32))
            if leaf not in ("lora_a", "lora_b") or arr.ndim != 2:
                raise AdapterError(
                    f"{where / MLX_WEIGHTS}: tensor {name} is not a LoRA factor "
                    "(<module>.lora_a / <module>.lora_b matrices)"
                )
            if not np.all(np.isfinite(arr)):
                raise AdapterError(
                    f"{where / MLX_WEIGHTS}: tensor {name} has non-finite values; "
                    "the adapter is corrupt (retrain or re-export it)"
                )
            # mlx-lm layout is (in, r) and (r, out); keep PEFT's (r, in) and (out, r).
            (a if leaf == "lora_a" else b)[module] = arr.T.copy()
        if not a or set(a) != set(b):
            raise AdapterError(
                f"{where / MLX_WEIGHTS}: every module needs both lora_a and lora_b "
                f"(found {len(a)} lora_a and {len(b)} lora_b)"
            )
        return _Trained(a=a, b=b, scale=scale, rslora=rslora)

    def _wrap(self, trained: _Trained, where: Path) -> None:
        """Wrap each adapted Linear not wrapped yet in an mlx-lm LoRALinear."""
        import mlx.nn as nn
        from mlx.utils import tree_unflatten
        from mlx_lm.tuner.lora import LoRALinear

        modules = dict(self._model.named_modules())
        wrapped = []
        for name in sorted(trained.a):
            r, n_in = trained.a[name].shape
            n_out = trained.b[name].shape[0]
            layer = self._lora[name].linear if name in self._lora else modules.get(name)
            if layer is None:
                raise AdapterError(
                    f"{where / MLX_WEIGHTS}: module {name} does not exist in base "
                    f"{self.base_id!r}; the adapter was trained for another architecture"
                )
            if not isinstance(layer, nn.Linear | nn.QuantizedLinear):
                raise AdapterError(
                    f"{where / MLX_WEIGHTS}: module {name} is a {type(layer).__name__}; "
                    "LoRA is supported on linear layers only (use the hf backend)"
                )
            lora = LoRALinear.from_base(cast(Any, layer), r=r, dropout=0.0)
            if tuple(lora.lora_a.shape) != (n_in, r) or tuple(lora.lora_b.shape) != (r, n_out):
                raise AdapterError(
                    f"{where / MLX_WEIGHTS}: {name} maps {n_in} -> {n_out} features but the "
                    f"base layer maps {lora.lora_a.shape[0]} -> {lora.lora_b.shape[1]}; the "
                    f"adapter does not match {self.base_id!r}"
                )
            if name not in self._lora:
                wrapped.append((name, lora))
        if wrapped:
            self._model.update_modules(tree_unflatten(wrapped))
            self._lora.update(wrapped)
            self._model.eval()

    def _unwrap(self) -> None:
        """Put the plain Linear layers back (no adapter on the model)."""
        from mlx.utils import tree_unflatten

        if self._lora:
            restore = [(name, layer.linear) for name, layer in self._lora.items()]
            self._model.update_modules(tree_unflatten(restore))
        self._lora = {}
        self._active = BASE_KEY

    def _mlx_pair(self, a: np.ndarray, b: np.ndarray, scale: float) -> tuple[Any, Any, float]:
        """PEFT-layout factors as mlx-lm's (in, r), (r, out) arrays in the base's float dtype."""
        mx = self._mx
        dtype = next(iter(self._lora.values())).linear.weight.dtype
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):
            dtype = mx.float32  # quantized base: the LoRA factors stay in float
        return mx.array(a.T).astype(dtype), mx.array(b.T).astype(dtype), float(scale)

    def _registered(self, key: str) -> bool:
        return key in self._views

    def _name_of(self, key: str) -> str:
        return key

    def _register_views(self, views: list[Derived]) -> None:
        """Build the LoRA weights of every view (a scaled copy shares the trained arrays)."""
        for view in views:
            trained = self._trained[view.adapter]
            if isinstance(view, Scaled):
                ft = self._views[Finetuned(view.adapter).key]
                self._views[view.key] = {m: (a, b, s * view.lam) for m, (a, b, s) in ft.items()}
            elif isinstance(view, Null):
                weights = {}
                for m in trained.a:
                    w = nulls.null_lora(
                        trained.a[m], trained.b[m], trained.scale, view, m, rslora=trained.rslora
                    )
                    weights[m] = self._mlx_pair(w.a, w.b, w.scaling)
                self._views[view.key] = weights
            else:
                raise BackendError(f"cannot register view {view!r}")

    def _module_weights(self, view: Derived) -> list[ModuleWeights]:
        """The view's factors as the layers receive them (PEFT layout, float32) and each base
        Linear's weight, (out, in) as mlx stores it (a quantized one dequantized)."""
        mx = self._mx
        out = []
        for module, (a, b, scale) in self._views[view.key].items():
            weight = self._base_weights.get(module)
            if weight is None:
                linear = self._lora[module].linear
                w = linear.weight
                if hasattr(linear, "scales"):  # nn.QuantizedLinear
                    w = mx.dequantize(
                        w,
                        linear.scales,
                        getattr(linear, "biases", None),
                        group_size=linear.group_size,
                        bits=linear.bits,
                        mode=getattr(linear, "mode", "affine"),
                    )
                weight = np.array(w.astype(mx.float32))
                weight.flags.writeable = False
                self._base_weights[module] = weight
            a32 = np.array(a.astype(mx.float32)).T.copy()
            b32 = np.array(b.astype(mx.float32)).T.copy()
            out.append(ModuleWeights(module, weight, a32, b32, float(scale)))
        return out

    def _use(self, key: str) -> None:
        """Point every LoRA layer at the view's weights; modules it lacks get rank-0 factors."""
        if key == self._active:
            return
        mx = self._mx
        weights = self._views.get(key, {})
        for name, layer in self._lora.items():
            if name in weights:
                layer.lora_a, layer.lora_b, layer.scale = weights[name]
            else:
                dtype = layer.lora_a.dtype
                layer.lora_a = mx.zeros((layer.lora_a.shape[0], 0), dtype=dtype)
                layer.lora_b = mx.zeros((0, layer.lora_b.shape[1]), dtype=dtype)
                layer.scale = 0.0
        self._active = key
        self._counters["view_switches"] += 1

    # ---- execution ----

    def _scope(self) -> Any:
        return self._mx.stream(self._device)

    def _row_groups(self, rows: list[Row]) -> Iterator[tuple[bool, list[Row]]]:
        """One group per view (and row kind), the active view first: a run of requests on one
        view never switches weights. The view's weights go in as its group is taken (the
        caller forwards a whole group before it takes the next)."""
        groups: dict[tuple[str, bool], list[Row]] = {}
        for row in sorted(rows, key=lambda r: (r.adapter != self._active, r.adapter, len(r.ids))):
            groups.setdefault((row.adapter, row.last), []).append(row)
        for (view, last), group in groups.items():
            self._use(view)
            yield last, group

    def _kl_runs(self, by_ids: dict[tuple[int, ...], list[KLRow]]) -> Iterator[list[Row]]:
        """One run per view over a block of windows that fits one batch, references first:
        weights switch once per view and block, and only one block's references are held."""
        block: list[tuple[int, ...]] = []
        for ids in [*sorted(by_ids, key=len), None]:
            fits = ids is not None and (
                (len(block) + 1) * len(ids) <= self.batch_tokens
                and len(block) < self.max_batch_rows
            )
            if block and not fits:
                pairs = [p for w in block for p in by_ids[w]]
                refs = dict.fromkeys(p.ref for p in pairs)
                for name in refs | dict.fromkeys(p.adapter for p in pairs):
                    run = [
                        Row(name, w, False)
                        for w in block
                        if any(name in (p.ref, p.adapter) for p in by_ids[w])
                    ]
                    self._use(name)
                    yield run
                block = []
            if ids is not None:
                block.append(ids)

    def _tokens(self, batch: list[Row]) -> Any:
        """The batch's ids, right padded: causal attention never sees the padding."""
        width = max(len(r.ids) for r in batch)
        ids = np.full((len(batch), width), self._pad, dtype=np.int32)
        for i, row in enumerate(batch):
            ids[i, : len(row.ids)] = row.ids
        return self._mx.array(ids)

    def _forward_dists(self, batch: list[Row]) -> list[Any]:
        """float64 log-softmax at every position but the last, per row (evaluated now)."""
        mx = self._mx
        logits = self._model(self._tokens(batch))
        self._count_pass(batch)
        out = [_log_softmax(mx, logits[i, : len(row.ids) - 1]) for i, row in enumerate(batch)]
        mx.eval(*out)
        return out

    def _next_logprobs(self, dists: Any, ids: tuple[int, ...]) -> np.ndarray:
        at = self._mx.array(list(ids[1:]))[:, None]
        return np.array(self._mx.take_along_axis(dists, at, axis=-1)[:, 0], dtype=np.float64)

    def _token_kl(self, logp_a: Any, logp_b: Any) -> np.ndarray:
        """sum_v p_a (log p_a - log p_b) per position, in float64 on the CPU stream (>= 0)."""
        mx, cpu = self._mx, self._mx.cpu
        diff = mx.subtract(logp_a, logp_b, stream=cpu)
        terms = mx.multiply(mx.exp(logp_a, stream=cpu), diff, stream=cpu)
        return np.maximum(np.array(mx.sum(terms, axis=-1, stream=cpu)), 0.0)

    def _forward(self, batch: list[Row], last: bool) -> list[np.ndarray]:
        """Log-probs of a right-padded batch: causal attention never sees the padding."""
        mx = self._mx
        tokens = self._tokens(batch)
        logits = self._model(tokens)
        self._count_pass(batch)
        if last:
            at = mx.array([len(r.ids) - 1 for r in batch])
            final = logits[mx.arange(len(batch)), at]
            logp = np.array(_log_softmax(mx, final))
            return [logp[i] for i in range(len(batch))]
        logits = logits[:, :-1]
        picked = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)
        values = np.array(_log_softmax(mx, logits, picked)[..., 0])
        return [values[i, : len(row.ids) - 1] for i, row in enumerate(batch)]

    def _generate_all(
        self, prompts: dict[Generate, tuple[int, ...]]
    ) -> dict[Generate, GenerationResult]:
        """Greedy decoding from each request's prompt ids (fitted to the context by
        `rows.plan`); prompts of one view and one length decode together in a batch."""
        from mlx_lm.models.cache import make_prompt_cache

        mx = self._mx
        out: dict[Generate, GenerationResult] = {}
        groups: dict[tuple[str, int, int], list[tuple[Generate, tuple[int, ...]]]] = {}
        for req, ids in prompts.items():
            key = (self._row_name(req.view), req.max_new_tokens, len(ids))
            groups.setdefault(key, []).append((req, ids))
        for (view, max_new, _), group in groups.items():
            self._use(view)
            for start in range(0, len(group), self.max_batch_rows):
                chunk = group[start : start + self.max_batch_rows]
                cache = make_prompt_cache(self._model)
                logits = self._model(mx.array([list(ids) for _, ids in chunk]), cache=cache)
                new: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                for step in range(max_new):
                    nxt = mx.argmax(logits[:, -1, :], axis=-1)
                    picked = np.array(nxt).tolist()
                    for i, tok in enumerate(picked):
                        if not done[i]:
                            new[i].append(int(tok))
                            done[i] = int(tok) in self._eos
                    self._counters["forward_passes"] += 1
                    if all(done) or step == max_new - 1:
                        break
                    logits = self._model(nxt[:, None], cache=cache)
                for (req, _), made in zip(chunk, new, strict=True):
                    text = self.tokenizer.decode(made, skip_special_tokens=True)
                    out[req] = GenerationResult(text=text, token_ids=tuple(made))
        return out

    def _release(self) -> None:
        self._base_weights = {}
        self._views = {}
        self._trained = {}
        self._lora = {}
        self._model = None
        self._mx.clear_cache()


def _log_softmax(mx: Any, logits: Any, at: Any = None) -> Any:
    """log_softmax(logits) (or its value at the logits `at`) in float64.

    The normaliser runs in float64 on the CPU stream: mlx's fp32 exp/log are approximations
    (logsumexp off by 2e-5 at 2k vocab, three times torch's fp32 error), float64 is exact.
    """
    lse = mx.logsumexp(
        logits.astype(mx.float64, stream=mx.cpu), axis=-1, keepdims=True, stream=mx.cpu
    )
    value = logits if at is None else at
    return mx.subtract(value.astype(mx.float64, stream=mx.cpu), lse, stream=mx.cpu)


def _mlx_info(path: Path) -> AdapterInfo:
    """An AdapterInfo for a directory already in mlx-lm's format."""
    cfg = json.loads((path / MLX_CONFIG).read_text(encoding="utf-8"))
    params = cfg.get("lora_parameters") or {}
    rank = int(params.get("rank", 0))
    return AdapterInfo(
        path=path,
        rank=rank,
        alpha=float(params.get("scale", 0.0)) * rank,
        target_modules=tuple(sorted(params.get("keys") or ())),
        base_model=str(cfg.get("model") or ""),
        sha256=file_sha256(path / MLX_WEIGHTS),
        size_bytes=(path / MLX_WEIGHTS).stat().st_size,
        num_tensors=0,
    )


def _pick_device(mx: Any, device: str) -> Any:
    if device == "auto":
        return mx.default_device()
    if device == "cpu":
        return mx.cpu
    if device in ("gpu", "metal", "cuda"):
        if not mx.is_available(mx.gpu):
            raise BackendError(f"device {device!r}: this mlx build has no GPU; use device: cpu")
        return mx.gpu
    raise BackendError(f"device {device!r} is not one of auto, cpu, gpu for the mlx backend")


def _pick_dtype(mx: Any, dtype: str) -> Any:
    table = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
    if dtype not in table:
        raise BackendError(f"dtype {dtype!r} is not one of auto, fp32, fp16, bf16")
    return table[dtype]
