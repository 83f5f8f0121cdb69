"""HuggingFace/PEFT backend: one base model, every view a named LoRA adapter on it.

Rows of different views share one forward pass through PEFT's per-row `adapter_names`
(left padding, position ids rebuilt from the attention mask). Divergences are computed
exactly over the full vocabulary from fp32 log-softmax inside the batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sway_engine.adapters import AdapterInfo, read_adapter
from sway_engine.backends.base import ALL_CAPABILITIES
from sway_engine.errors import AdapterError, BackendError
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Divergence,
    DivergenceResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
    TokenDist,
    views_of,
)
from sway_engine.views import Base, Finetuned, Null, Scaled, View, canonical

if TYPE_CHECKING:
    import torch

BASE_NAME = "__base__"
LN2 = math.log(2.0)


@dataclass(frozen=True)
class _Row:
    """One sequence to forward under one adapter. `last`: keep only the final position."""

    adapter: str
    ids: tuple[int, ...]
    last: bool


def _import_stack() -> tuple[Any, Any, Any]:
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise BackendError(
            f"the hf backend needs torch, transformers and peft ({exc.name} is missing): "
            "pip install 'sway[hf]'"
        ) from exc
    return torch, transformers, peft


class HFBackend:
    """Loads the base once; registers the trained adapter, nulls and scaled copies on it."""

    kind = "hf"
    capabilities = ALL_CAPABILITIES
    # Base models loaded by this process (a run must load its base once, however many probes).
    base_loads = 0

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
    ) -> None:
        torch, transformers, _ = _import_stack()
        self._torch = torch
        self.base_id = base
        self.device = _pick_device(torch, device)
        self.dtype = _pick_dtype(torch, dtype, self.device)
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                base, trust_remote_code=trust_remote_code
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                base, dtype=self.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load base model {base!r}: {exc}") from exc
        self.tokenizer.padding_side = "left"
        self.tokenizer.model_max_length = 1 << 30  # long texts are windowed here, never truncated
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._base_model = model.to(self.device).eval()
        HFBackend.base_loads += 1
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(model.config.vocab_size)
        self._peft: Any = None
        self._ft_name = ""
        self._generation = 0
        self._names: dict[str, str] = {}
        self.adapter: AdapterInfo | None = None
        self._row_cache: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()
        self._row_cache_bytes = row_cache_bytes
        self._row_cache_used = 0
        self._counters: dict[str, float] = {
            "forward_passes": 0,
            "rows_forwarded": 0,
            "tokens_forwarded": 0,
            "padded_tokens": 0,
            "row_cache_hits": 0,
            "adapters_loaded": 0,
            "views_registered": 0,
        }
        if adapter is not None:
            self.load_adapter(str(adapter))

    # ---- adapters and views ----

    def load_adapter(self, path: str) -> None:
        """Swap the trained adapter in place; derived views are rebuilt on demand."""
        info = read_adapter(path)
        _, _, peft = _import_stack()
        self._generation += 1
        name = f"ft{self._generation}"
        try:
            if self._peft is None:
                self._peft = peft.PeftModel.from_pretrained(
                    self._base_model, str(info.path), adapter_name=name, is_trainable=False
                )
            else:
                self._peft.load_adapter(str(info.path), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterError(
                f"adapter {info.path} does not fit base {self.base_id!r}: {exc}"
            ) from exc
        self._peft.set_adapter(name)
        for old in [n for n in self._peft.peft_config if n != name]:
            self._peft.delete_adapter(old)
        self._peft.eval()
        self._ft_name = name
        self._names = {"ft": name}
        self._row_cache.clear()
        self._row_cache_used = 0
        self.adapter = info
        self._counters["adapters_loaded"] += 1

    def _adapter_name(self, view: View) -> str:
        view = canonical(view)
        if isinstance(view, Base):
            return BASE_NAME
        if view.key not in self._names:
            self._ensure_views([view])
        return self._names[view.key]

    def _ensure_views(self, views: Iterable[View]) -> None:
        """Register every view not on the model yet, in one pass (one module scan)."""
        todo = list(
            dict.fromkeys(
                v
                for v in map(canonical, views)
                if not isinstance(v, Base) and v.key not in self._names
            )
        )
        if not todo:
            return
        if self._peft is None:
            raise BackendError(f"view {todo[0].key} needs a trained adapter; none is loaded")
        ft_cfg = self._peft.peft_config[self._ft_name]
        for view in todo:
            name = f"v{self._generation}_{len(self._names)}"
            self._peft.add_adapter(name, _replace_cfg(ft_cfg, view))
            self._names[view.key] = name
        layers = self._lora_layers()
        with self._torch.no_grad():
            for view in todo:
                self._fill(layers, view, self._names[view.key])
        self._peft.set_adapter(self._ft_name)
        self._peft.eval()
        self._counters["views_registered"] += len(todo)

    def _fill(self, layers: list[Any], view: View, name: str) -> None:
        """Write a derived view's LoRA weights: scaled copy, or a seeded null."""
        torch = self._torch
        gen = torch.Generator().manual_seed(view.seed) if isinstance(view, Null) else None
        for layer in layers:
            a_ft = layer.lora_A[self._ft_name].weight
            b_ft = layer.lora_B[self._ft_name].weight
            a_new = layer.lora_A[name].weight
            b_new = layer.lora_B[name].weight
            if isinstance(view, Scaled):
                a_new.copy_(a_ft)
                b_new.copy_(b_ft * view.lam)
                continue
            assert isinstance(view, Null) and gen is not None
            a = torch.randn(a_new.shape, generator=gen, dtype=torch.float32)
            b = torch.randn(b_new.shape, generator=gen, dtype=torch.float32)
            if view.mode == "fixed":
                a, b = a * view.init_scale, b * view.init_scale
            else:
                target = float(
                    torch.linalg.matrix_norm(
                        layer.scaling[self._ft_name] * (b_ft.float() @ a_ft.float())
                    )
                )
                have = float(torch.linalg.matrix_norm(layer.scaling[name] * (b @ a)))
                c = math.sqrt(target / have) if have > 0 else 0.0
                a, b = a * c, b * c
            a_new.copy_(a.to(a_new.dtype))
            b_new.copy_(b.to(b_new.dtype))

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        layers = [m for _, m in self._peft.named_modules() if isinstance(m, LoraLayer)]
        for layer in layers:
            if self._ft_name in getattr(layer, "lora_embedding_A", {}):
                raise AdapterError("LoRA on embedding layers is not supported for derived views")
        return layers

    # ---- execution ----

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        self._ensure_views(v for req in requests for v in views_of(req))
        rows: dict[_Row, Any] = {}
        plans: list[Any] = []
        for req in requests:
            plan = self._plan(req)
            plans.append(plan)
            for row in plan[1]:
                rows.setdefault(row, None)
        self._forward_all(rows)
        gens = self._generate_all([r for r in requests if isinstance(r, Generate)])
        out: list[Result] = []
        for req, plan in zip(requests, plans, strict=True):
            if isinstance(req, Generate):
                out.append(gens[req])
            else:
                out.append(self._assemble(req, plan, rows))
        return out

    def _ids(self, text: str, *, special: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if special and not ids:
            fallback = self.tokenizer.bos_token_id
            ids = [fallback if fallback is not None else self.tokenizer.eos_token_id]
        return ids

    def _plan(self, req: Request) -> tuple[Any, list[_Row]]:
        if isinstance(req, NextToken):
            ids = tuple(self._ids(req.prompt)[-self.max_len :])
            return ids, [_Row(self._adapter_name(req.view), ids, True)]
        if isinstance(req, Divergence):
            ids = tuple(self._ids(req.prompt)[-self.max_len :])
            return ids, [
                _Row(self._adapter_name(req.view_a), ids, True),
                _Row(self._adapter_name(req.view_b), ids, True),
            ]
        if isinstance(req, RollingLogprob):
            text_ids = self._ids(req.text)
            windows = _windows(text_ids, self.max_len)
            name = self._adapter_name(req.view)
            keeps = [keep for _, keep in windows]
            return (text_ids, keeps), [_Row(name, w, False) for w, _ in windows]
        if isinstance(req, ContinuationLogprob):
            p_ids = self._ids(req.prompt)
            c_ids = self._ids(req.completion, special=False)
            if not c_ids:
                raise BackendError(f"completion {req.completion!r} tokenizes to zero tokens")
            seq = tuple((p_ids + c_ids)[-self.max_len :])
            n_c = min(len(c_ids), len(seq) - 1)
            return (seq, n_c), [_Row(self._adapter_name(req.view), seq, False)]
        if isinstance(req, Generate):
            return None, []
        raise BackendError(f"hf backend cannot answer {type(req).__name__}")

    def _forward_all(self, rows: dict[_Row, Any]) -> None:
        todo: list[_Row] = []
        for row in rows:
            hit = self._row_cache.get((row.adapter, row.ids)) if row.last else None
            if hit is not None:
                rows[row] = hit
                self._row_cache.move_to_end((row.adapter, row.ids))
                self._counters["row_cache_hits"] += 1
            else:
                todo.append(row)
        for last in (True, False):
            group = sorted((r for r in todo if r.last == last), key=lambda r: len(r.ids))
            for batch in self._batches(group):
                for row, value in zip(batch, self._forward(batch, last), strict=True):
                    rows[row] = value
                    if last:
                        self._remember(row, value)

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        for row in rows:
            width = len(row.ids)
            if current and (
                (len(current) + 1) * width > self.batch_tokens
                or len(current) >= self.max_batch_rows
            ):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def _forward(self, batch: list[_Row], last: bool) -> list[Any]:
        torch = self._torch
        width = max(len(r.ids) for r in batch)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, width - len(row.ids) :] = torch.tensor(row.ids)
            mask[i, width - len(row.ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": pos.to(self.device),
        }
        if last:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            if self._peft is not None:
                logits = self._peft(**kwargs, adapter_names=[r.adapter for r in batch]).logits
            else:
                logits = self._base_model(**kwargs).logits
        self._counters["forward_passes"] += 1
        self._counters["rows_forwarded"] += len(batch)
        self._counters["tokens_forwarded"] += sum(len(r.ids) for r in batch)
        self._counters["padded_tokens"] += width * len(batch)
        if last:
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu()
            return [logp[i] for i in range(len(batch))]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, row in enumerate(batch):
            n = len(row.ids)
            seq = logp[i, width - n : width - 1]
            nxt = torch.tensor(row.ids[1:], device=seq.device)
            out.append(seq.gather(-1, nxt[:, None])[:, 0].cpu().numpy().astype(np.float64))
        return out

    def _remember(self, row: _Row, value: Any) -> None:
        size = int(value.numel()) * 4
        if size > self._row_cache_bytes:
            return
        self._row_cache[(row.adapter, row.ids)] = value
        self._row_cache_used += size
        while self._row_cache_used > self._row_cache_bytes:
            _, old = self._row_cache.popitem(last=False)
            self._row_cache_used -= int(old.numel()) * 4

    def _assemble(
        self, req: Request, plan: tuple[Any, list[_Row]], rows: dict[_Row, Any]
    ) -> Result:
        torch = self._torch
        meta, needed = plan
        values = [rows[r] for r in needed]
        if isinstance(req, NextToken):
            logp = _finite_or_raise(values[0], req.view, req.prompt)
            k = min(req.top_k, logp.shape[-1])
            top = torch.topk(logp, k)
            ids = top.indices.numpy()
            lps = top.values.numpy().astype(np.float64)
            return TokenDist(
                token_ids=ids,
                logprobs=lps,
                vocab_size=int(logp.shape[-1]),
                tail_mass=float(max(0.0, 1.0 - np.exp(lps).sum())),
                tokens=tuple(self.tokenizer.convert_ids_to_tokens(ids.tolist())),
            )
        if isinstance(req, Divergence):
            la = _finite_or_raise(values[0], req.view_a, req.prompt)
            lb = _finite_or_raise(values[1], req.view_b, req.prompt)
            return _exact_divergence(torch, la, lb, req.evidence_k, self._decode_top)
        if isinstance(req, RollingLogprob):
            ids, keeps = meta
            parts = [v[len(v) - keep :] for v, keep in zip(values, keeps, strict=True)]
            lps = np.concatenate(parts) if parts else np.zeros(0)
            _finite_or_raise_np(lps, req.view, req.text)
            return RollingResult(token_ids=np.asarray(ids, dtype=np.int64), logprobs=lps)
        if isinstance(req, ContinuationLogprob):
            _, n_c = meta
            lps = values[0][-n_c:]
            _finite_or_raise_np(lps, req.view, req.prompt)
            return ContinuationResult(logprob=float(lps.sum()), num_tokens=int(n_c))
        raise BackendError(f"hf backend cannot answer {type(req).__name__}")

    def _decode_top(self, logp: Any, k: int) -> tuple[tuple[str, float], ...]:
        top = self._torch.topk(logp, k)
        toks = self.tokenizer.convert_ids_to_tokens(top.indices.tolist())
        return tuple(
            (t, float(math.exp(v))) for t, v in zip(toks, top.values.tolist(), strict=True)
        )

    def _generate_all(self, reqs: list[Generate]) -> dict[Generate, GenerationResult]:
        torch = self._torch
        out: dict[Generate, GenerationResult] = {}
        groups: dict[tuple[str, int], list[Generate]] = {}
        for req in dict.fromkeys(reqs):
            groups.setdefault((self._adapter_name(req.view), req.max_new_tokens), []).append(req)
        model = self._peft if self._peft is not None else self._base_model
        for (adapter, max_new), group in groups.items():
            for start in range(0, len(group), self.max_batch_rows):
                chunk = group[start : start + self.max_batch_rows]
                enc = self.tokenizer([g.prompt for g in chunk], return_tensors="pt", padding=True)
                kwargs: dict[str, Any] = {}
                if self._peft is not None:
                    kwargs["adapter_names"] = [adapter] * len(chunk)
                with torch.inference_mode():
                    gen = model.generate(
                        input_ids=enc["input_ids"].to(self.device),
                        attention_mask=enc["attention_mask"].to(self.device),
                        max_new_tokens=max_new,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **kwargs,
                    )
                self._counters["forward_passes"] += max_new
                new = gen[:, enc["input_ids"].shape[1] :].cpu()
                for req, ids in zip(chunk, new, strict=True):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    out[req] = GenerationResult(text=text, token_ids=tuple(int(i) for i in ids))
        return out

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def close(self) -> None:
        self._row_cache.clear()
        self._peft = None
        self._base_model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _replace_cfg(cfg: Any, view: View) -> Any:
    """A LoRA config for a derived view: same targets and alpha; nulls may change rank."""
    import copy

    new = copy.deepcopy(cfg)
    new.inference_mode = True
    if isinstance(view, Null):
        new.r = max(1, round(cfg.r * view.rank_scale))
        new.rank_pattern = {
            k: max(1, round(v * view.rank_scale)) for k, v in cfg.rank_pattern.items()
        }
    elif not isinstance(view, Scaled | Finetuned):
        raise BackendError(f"cannot register view {view!r}")
    return new


def _windows(ids: list[int], max_len: int) -> list[tuple[tuple[int, ...], int]]:
    """(window, how many trailing positions it newly scores) covering a long text.

    Each later window advances by max_len // 2 and keeps at least half a window of context.
    """
    if len(ids) < 2:
        return []
    if len(ids) <= max_len:
        return [(tuple(ids), len(ids) - 1)]
    stride = max_len // 2
    out = [(tuple(ids[:max_len]), max_len - 1)]
    end = max_len
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        out.append((tuple(ids[new_end - max_len : new_end]), new_end - end))
        end = new_end
    return out


def _finite_or_raise(logp: Any, view: View, prompt: str) -> Any:
    import torch

    if not bool(torch.isfinite(logp).all()):
        raise BackendError(
            f"view {view.key} produced non-finite logits on prompt {prompt[:40]!r}; "
            "the adapter or model is corrupt"
        )
    return logp


def _finite_or_raise_np(lps: np.ndarray, view: View, text: str) -> None:
    if not np.all(np.isfinite(lps)):
        raise BackendError(
            f"view {view.key} produced non-finite log-probs on {text[:40]!r}; "
            "the adapter or model is corrupt"
        )


def _exact_divergence(torch: Any, la: Any, lb: Any, k: int, decode: Any) -> DivergenceResult:
    """JS and both KLs from fp32 log-softmax rows, accumulated in fp64 (identical rows give 0)."""
    la, lb = la.double(), lb.double()
    pa, pb = la.exp(), lb.exp()
    lm = torch.logaddexp(la, lb) - LN2

    def kl(p: Any, lp: Any, lq: Any) -> float:
        return max(float(torch.where(p > 0, p * (lp - lq), 0.0).sum()), 0.0)

    js = min(0.5 * (kl(pa, la, lm) + kl(pb, lb, lm)), LN2)
    return DivergenceResult(
        js=js,
        kl_b_a=kl(pb, lb, la),
        kl_a_b=kl(pa, la, lb),
        exact=True,
        top_a=decode(la, k),
        top_b=decode(lb, k),
    )


def _pick_device(torch: Any, device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _pick_dtype(torch: Any, dtype: str, device: str) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise BackendError(f"dtype {dtype!r} is not one of auto, fp32, fp16, bf16")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "mps":
        return torch.float16
    return torch.float32
