"""HuggingFace/PEFT backend: one base model, every view a named LoRA adapter on it.

Rows of different views share one forward pass through PEFT's per-row `adapter_names`
(left padding, position ids rebuilt from the attention mask). Divergences are computed
exactly over the full vocabulary from fp32 log-softmax inside the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sway_engine import stats
from sway_engine.adapters import WEIGHTS, AdapterInfo, read_adapter
from sway_engine.backends.base import ALL_CAPABILITIES
from sway_engine.backends.hf_lora import (
    add_row_updates,
    add_slot,
    layers_take_config,
    plain_linear,
    replace_cfg,
    segments,
)
from sway_engine.backends.rows import (
    Plan,
    Row,
    RowCache,
    answer,
    collect,
    generation_prompts,
    logprob_result,
    token_dist,
)
from sway_engine.backends.rows import plan as plan_rows
from sway_engine.errors import AdapterError, BackendError
from sway_engine.nulls import PEFT_PREFIX
from sway_engine.requests import (
    ContinuationLogprob,
    Divergence,
    DivergenceResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    views_of,
)
from sway_engine.views import Base, Finetuned, Null, Scaled, View, canonical

if TYPE_CHECKING:
    import torch

BASE_NAME = "__base__"


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
        pad_tokens_per_pass: int | None = None,
        row_cache_bytes: int = 256 << 20,
    ) -> None:
        torch, transformers, _ = _import_stack()
        self._torch = torch
        self.base_id = base
        self.device = _pick_device(torch, device)
        self.dtype = _pick_dtype(torch, dtype, self.device)
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        self._pad_tokens_per_pass = pad_tokens_per_pass
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
        self.tokenizer.model_max_length = 1 << 30  # rows.plan windows or cuts long texts
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._base_model = model.to(self.device).eval()
        # One more forward pass costs about as much as this many more tokens on this model
        # (fixed per-pass work over per-token work, measured on CPU): tiny models pay ~100s,
        # a 135M model a few. `_batches` trades padding against passes with it.
        params = sum(p.numel() for p in model.parameters())
        self.pad_tokens_per_pass = (
            pad_tokens_per_pass
            if pad_tokens_per_pass is not None
            else max(4, min(256, int(2e8 / max(params, 1))))
        )
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(model.config.vocab_size)
        self._peft: Any = None
        self._ft_name = ""
        self._generation = 0
        self._names: dict[str, str] = {}
        self._layer_list: list[Any] | None = None
        self._names_cache: tuple[list[Any], dict[int, str]] | None = None
        self._views_made = 0
        self._row_plan: list[tuple[str, int, int]] | None = None  # (adapter, rows s:e)
        # Layers carrying sway's row hook, by id; the layer is kept so its id stays unique.
        # A hook outlives adapter swaps (it reads the current plan), so it is added only once.
        self._hooked: dict[int, Any] = {}
        self._peft_active: bool | None = None  # PEFT's own LoRA path on (None: unknown)
        self._row_lora: bool | None = None  # batched LoRA usable (None: not checked yet)
        self._factors: dict[int, dict[Any, Any]] = {}
        self._zero: dict[str, bool] = {}  # adapter name -> its update is exactly zero
        self.adapter: AdapterInfo | None = None
        self.extra_adapters: dict[str, AdapterInfo] = {}
        self._row_cache = RowCache(row_cache_bytes, lambda v: int(v.numel()) * 4)
        self._counters: dict[str, float] = {
            "forward_passes": 0,
            "rows_forwarded": 0,
            "tokens_forwarded": 0,
            "padded_tokens": 0,
            "row_cache_hits": 0,
            "base_loads": 1,
            "adapters_loaded": 0,
            "views_registered": 0,
        }
        if adapter is not None:
            self.load_adapter(str(adapter))

    # ---- adapters and views ----

    def load_adapter(self, path: str) -> None:
        """Swap the trained adapter in place; derived views are rebuilt on demand."""
        info = read_adapter(path)
        self._check_modules(info)
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
        self._names = {Finetuned().key: name}
        self._layer_list = None
        self._peft_active = None
        self._row_lora = None
        self._factors = {}
        self._row_cache.clear()
        self.adapter = info
        self.extra_adapters = {}
        self._counters["adapters_loaded"] += 1

    def add_adapter(self, path: str | Path, label: str) -> str:
        """Register another trained adapter of this base beside the primary one.

        Views with `adapter=label` (`Finetuned(label)`, `Scaled(lam, label)`, `Null(...,
        adapter=label)`) then derive from it, and their rows share batches (and base rows)
        with every other adapter's. `load_adapter` drops all of them.
        """
        if not label:
            raise BackendError("add_adapter needs a non-empty label; '' names the primary adapter")
        if self._peft is None:
            raise BackendError("load the primary adapter (load_adapter) before adding others")
        key = Finetuned(label).key
        if key in self._names:
            raise BackendError(f"an adapter labelled {label!r} is already registered")
        info = read_adapter(str(path))
        self._check_modules(info)
        name = f"ft{self._generation}_{len(self.extra_adapters) + 1}"
        try:
            self._peft.load_adapter(str(info.path), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterError(
                f"adapter {info.path} does not fit base {self.base_id!r}: {exc}"
            ) from exc
        self._peft.set_adapter(self._ft_name)
        self._peft.eval()
        self._names[key] = name
        self._layer_list = None  # another adapter may target modules the primary does not
        self._peft_active = None
        self._row_lora = None
        self.extra_adapters[label] = info
        self._counters["adapters_loaded"] += 1
        return label

    def _check_modules(self, info: AdapterInfo) -> None:
        """Every module the adapter's tensors name must exist in the base. PEFT only warns about
        keys it cannot place, and an adapter whose keys were renamed on export (model.layers ->
        model.blocks) then runs as the base and is scored as "did nothing"."""
        from safetensors import safe_open

        with safe_open(str(info.path / WEIGHTS), "np") as weights:
            keys = list(weights.keys())
        wanted = {k.split(".lora_")[0].removeprefix(PEFT_PREFIX) for k in keys if ".lora_" in k}
        have = {n for n, _ in self._base_model.named_modules()}
        missing = sorted(m for m in wanted if m not in have)
        if missing or not wanted:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise AdapterError(
                f"adapter {info.path} does not fit base {self.base_id!r}: "
                + (f"no module {shown} in the base" if missing else "no LoRA tensors")
                + " (keys renamed on export, or the adapter belongs to another model)"
            )

    def _adapter_name(self, view: View) -> str:
        """The name rows of `view` are computed under. A view whose update is exactly zero in
        every layer (a zero adapter, and so its norm-matched nulls) is the base: its rows are
        the base's rows, computed once."""
        view = canonical(view)
        if isinstance(view, Base):
            return BASE_NAME
        if view.key not in self._names:
            self._ensure_views([view])
        name = self._names[view.key]
        zero = self._zero.get(name)
        if zero is None:
            zero = self._zero[name] = self._update_is_zero(name)
        return BASE_NAME if zero else name

    def _update_is_zero(self, name: str) -> bool:
        """True when adapter `name`'s B (or A) factor is all zeros in every layer it adapts."""
        torch = self._torch
        with torch.no_grad():
            for layer in self._layers():
                if name not in layer.lora_A:
                    continue
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                if bool(torch.any(a != 0)) and bool(torch.any(b != 0)):
                    return False
        return True

    def _ensure_views(self, views: Iterable[View]) -> None:
        """Register every view not on the model yet, in one pass.

        New views are added as slots of the LoRA layers already on the model, not through
        PEFT's `add_adapter`, whose module scan and per-adapter bookkeeping grow with the
        number of adapters (100 views on the fixture: 51 s that way, 11 s through PEFT's
        `update_layer`, well under a second as plain slots; see `add_slot`).
        """
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
        for view in todo:
            if isinstance(view, Finetuned):
                raise BackendError(
                    f"no trained adapter labelled {view.adapter!r} is registered "
                    "(HFBackend.add_adapter registers one)"
                )
            if Finetuned(view.adapter).key not in self._names:
                raise BackendError(
                    f"view {view.key} derives from adapter {view.adapter!r}, which is not "
                    "registered (HFBackend.add_adapter registers one)"
                )
        fast = layers_take_config(self._layers()) or plain_linear(self._layers())
        made: list[tuple[Finetuned | Scaled | Null, str, list[Any]]] = []
        for view in todo:
            src = self._names[Finetuned(view.adapter).key]
            cfg = replace_cfg(self._peft.peft_config[src], view)
            self._views_made += 1
            name = f"v{self._generation}_{self._views_made}"
            if fast:
                layers = self._register_view(src, name, cfg, view)
            else:
                self._peft.add_adapter(name, cfg)
                self._layer_list = None
                layers = [m for m in self._layers() if src in m.lora_A]
            self._names[view.key] = name
            made.append((view, name, layers))
        with self._torch.no_grad():
            for view, name, layers in made:
                with self._deriving_from(self._names[Finetuned(view.adapter).key]):
                    self._fill(layers, view, name)
        if not fast:
            self._peft.set_adapter(self._ft_name)
            self._peft.eval()
        self._counters["views_registered"] += len(todo)

    def _layers(self) -> list[Any]:
        """Every LoRA layer of the model (scanned once per set of trained adapters)."""
        if self._layer_list is None:
            self._layer_list = self._lora_layers()
        return self._layer_list

    def _register_view(self, src: str, name: str, cfg: Any, view: View) -> list[Any]:
        """Add adapter `name` to every layer trained adapter `src` adapts; return those layers.

        Rank: the source's per-layer rank (a null's scaled by rank_scale), alpha the source's,
        so scaling = alpha/r as PEFT would compute it from `cfg`'s rank and alpha patterns.
        """
        self._peft.peft_config[name] = cfg
        layers = [m for m in self._layers() if src in m.lora_A]
        plain = plain_linear(layers, src)
        for layer in layers:
            r = int(layer.r[src])
            if isinstance(view, Null):
                r = max(1, round(r * view.rank_scale))
            if plain:
                add_slot(self._torch, layer, src, name, r, bool(cfg.use_rslora))
                continue
            layer.update_layer(name, r, lora_alpha=layer.lora_alpha[src], config=cfg)
            for part in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                part[name].train(False)  # new modules start in training mode (dropout)
        return layers

    def _layer_names(self) -> dict[int, str]:
        """Module name by id of every module, scanned once per LoRA layer list (not per view)."""
        layers = self._layers()
        if self._names_cache is None or self._names_cache[0] is not layers:
            self._names_cache = (layers, {id(m): n for n, m in self._peft.named_modules()})
        return self._names_cache[1]

    @contextmanager
    def _deriving_from(self, src: str) -> Iterator[None]:
        """While filling a view's weights, `_fill` reads the trained adapter `src`."""
        primary = self._ft_name
        self._ft_name = src
        try:
            yield
        finally:
            self._ft_name = primary

    def _fill(self, layers: list[Any], view: View, name: str) -> None:
        """Write a derived view's LoRA weights: scaled copy, or a seeded null.

        Nulls come from `sway_engine.nulls` (seeded per module name), so every backend
        draws the same null weights from the same trained adapter.
        """
        from sway_engine import nulls

        torch = self._torch
        names = self._layer_names() if isinstance(view, Null) else {}
        rslora = bool(getattr(self._peft.peft_config[self._ft_name], "use_rslora", False))
        for layer in layers:
            a_ft = layer.lora_A[self._ft_name].weight
            b_ft = layer.lora_B[self._ft_name].weight
            a_new = layer.lora_A[name].weight
            b_new = layer.lora_B[name].weight
            if isinstance(view, Scaled):
                a_new.copy_(a_ft)
                b_new.copy_(b_ft * view.lam)
                continue
            assert isinstance(view, Null)
            w = nulls.null_lora(
                a_ft.detach().float().cpu().numpy(),
                b_ft.detach().float().cpu().numpy(),
                float(layer.scaling[self._ft_name]),
                view,
                names[id(layer)],
                rslora=rslora,
            )
            if tuple(a_new.shape) != w.a.shape or tuple(b_new.shape) != w.b.shape:
                raise BackendError(
                    f"null {view.key} on {names[id(layer)]}: registered rank "
                    f"{a_new.shape[0]} differs from the null's rank {w.a.shape[0]}"
                )
            layer.scaling[name] = w.scaling
            a_new.copy_(torch.from_numpy(w.a).to(a_new.dtype))
            b_new.copy_(torch.from_numpy(w.b).to(b_new.dtype))

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
        rows, plans = collect(requests, self._plan)
        self._forward_all(rows)
        gens = self._generate_all(generation_prompts(requests, plans))
        return answer(requests, plans, rows, gens, self._assemble)

    def _plan(self, req: Request) -> Plan:
        return plan_rows(req, self.tokenizer, self.max_len, self._adapter_name)

    def _forward_all(self, rows: dict[Row, Any]) -> None:
        todo, hits = self._row_cache.fill(rows)
        self._counters["row_cache_hits"] += hits
        for last in (True, False):
            group = sorted((r for r in todo if r.last == last), key=lambda r: len(r.ids))
            for batch in self._batches(group):
                batch.sort(key=lambda r: r.adapter)  # one contiguous block of rows per adapter
                for row, value in zip(batch, self._forward(batch, last), strict=True):
                    rows[row] = value
                    if last:
                        self._row_cache.put(row, value)

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """Pack rows (sorted by length) into batches within the token and row budgets.

        A batch is also closed where widening it to the next row would add more padding
        than `pad_tokens_per_pass` (the cost of one more forward pass, in tokens), so
        the padding stays a few percent of the real tokens.
        """
        batches: list[list[Row]] = []
        current: list[Row] = []
        for row in rows:
            width = len(row.ids)
            if current and (
                (len(current) + 1) * width > self.batch_tokens
                or len(current) >= self.max_batch_rows
                or (width - len(current[-1].ids)) * len(current) > self.pad_tokens_per_pass
            ):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def _forward(self, batch: list[Row], last: bool) -> list[Any]:
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
            if self._peft is not None and self._row_lora_ready():
                self._row_plan = segments([r.adapter for r in batch])
                try:
                    logits = self._base_model(**kwargs).logits
                finally:
                    self._row_plan = None
            elif self._peft is not None:
                self._peft_lora(True)
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

    # ---- batched LoRA for scoring forwards ----

    def _row_lora_ready(self) -> bool:
        """Switch scoring forwards to sway's batched LoRA; False where it cannot apply.

        PEFT's mixed-batch forward loops over the adapters of a batch in every LoRA layer
        (plus a module scan per call): with dozens of views per batch that loop costs more
        than the model. Here PEFT's own LoRA path is switched off and a forward hook on
        each LoRA layer adds each adapter's update to its block of rows (rows are sorted
        by adapter, so a block is a slice: no gather, no scatter): two matmuls and one
        in-place add per adapter, the same arithmetic as PEFT's. Plain linear LoRA only
        (as `add_slot`); anything else keeps PEFT's path.
        """
        layers = self._layers()
        if self._row_lora is None:
            self._row_lora = plain_linear(layers)
        if not self._row_lora:
            return False
        for layer in layers:
            if id(layer) not in self._hooked:
                layer.register_forward_hook(self._row_hook)
                self._hooked[id(layer)] = layer
        self._peft_lora(False)
        return True

    def _peft_lora(self, on: bool) -> None:
        """Turn PEFT's own LoRA computation on or off in every layer (only when it changes)."""
        if self._peft_active is on:
            return
        for layer in self._layers():
            layer.enable_adapters(on)
        self._peft_active = on

    def _row_hook(self, layer: Any, args: tuple[Any, ...], output: Any) -> Any:
        plan = self._row_plan
        if plan is None:
            return None
        table = self._factors.setdefault(id(layer), {})
        return add_row_updates(self._torch, layer, table, args[0], output, plan)

    def _assemble(self, req: Request, plan: Plan, rows: dict[Row, Any]) -> Result:
        torch = self._torch
        meta = plan.meta
        values = [rows[r] for r in plan.rows]
        if isinstance(req, NextToken):
            logp = _finite_or_raise(values[0], req.view, req.prompt)
            k = min(req.top_k, logp.shape[-1])
            top = torch.topk(logp, k)
            return token_dist(
                self.tokenizer, top.indices.numpy(), top.values.numpy(), int(logp.shape[-1])
            )
        if isinstance(req, Divergence):
            la = _finite_or_raise(values[0], req.view_a, req.prompt)
            lb = _finite_or_raise(values[1], req.view_b, req.prompt)
            return _exact_divergence(la, lb, req.evidence_k, self._decode_top)
        if isinstance(req, RollingLogprob | ContinuationLogprob):
            return logprob_result(req, meta, values)
        raise BackendError(f"hf backend cannot answer {type(req).__name__}")

    def _decode_top(self, logp: Any, k: int) -> tuple[tuple[str, float], ...]:
        top = self._torch.topk(logp, k)
        toks = self.tokenizer.convert_ids_to_tokens(top.indices.tolist())
        return tuple(
            (t, float(math.exp(v))) for t, v in zip(toks, top.values.tolist(), strict=True)
        )

    def _generate_all(
        self, prompts: dict[Generate, tuple[int, ...]]
    ) -> dict[Generate, GenerationResult]:
        """Greedy generation from each request's prompt ids (fitted to the context by
        `rows.plan`). With batched LoRA available, rows of every view share one generate call
        (the row hook applies each row's adapter at every decode step); otherwise one PEFT
        generate per view."""
        out: dict[Generate, GenerationResult] = {}
        reqs = list(prompts)
        mixed = self._peft is not None and bool(reqs) and self._row_lora_ready()
        groups: dict[tuple[str, int], list[Generate]] = {}
        # Views computed under one name (a zero update is the base) generate once.
        first: dict[tuple[str, str, int], Generate] = {}
        same: list[tuple[Generate, Generate]] = []
        for req in reqs:
            name = self._adapter_name(req.view)
            key = (req.prompt, name, req.max_new_tokens)
            if key in first:
                same.append((req, first[key]))
                continue
            first[key] = req
            groups.setdefault(("" if mixed else name, req.max_new_tokens), []).append(req)
        if self._peft is not None and reqs and not mixed:
            self._peft_lora(True)
        for (_, max_new), group in groups.items():
            # rows of one adapter contiguous: the row hook adds each adapter to its block
            group.sort(key=lambda g: self._adapter_name(g.view))
            for start in range(0, len(group), self.max_batch_rows):
                chunk = group[start : start + self.max_batch_rows]
                out.update(self._generate_chunk(chunk, prompts, max_new, mixed))
        for req, twin in same:
            out[req] = out[twin]
        return out

    def _generate_chunk(
        self,
        chunk: list[Generate],
        prompts: dict[Generate, tuple[int, ...]],
        max_new: int,
        mixed: bool,
    ) -> dict[Generate, GenerationResult]:
        torch = self._torch
        width = max(len(prompts[g]) for g in chunk)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, g in enumerate(chunk):  # left padding, as in `_forward`
            input_ids[i, width - len(prompts[g]) :] = torch.tensor(prompts[g])
            mask[i, width - len(prompts[g]) :] = 1
        names = [self._adapter_name(g.view) for g in chunk]
        kwargs: dict[str, Any] = {}
        model = self._base_model
        if self._peft is not None and not mixed:
            model = self._peft
            kwargs["adapter_names"] = names
        with torch.inference_mode():
            self._row_plan = segments(names) if mixed else None
            try:
                gen = model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **kwargs,
                )
            finally:
                self._row_plan = None
        self._counters["forward_passes"] += max_new
        eos = self.tokenizer.eos_token_id
        out: dict[Generate, GenerationResult] = {}
        for req, row in zip(chunk, gen[:, width:].cpu(), strict=True):
            ids = [int(i) for i in row]
            if eos in ids:  # a row that ended early is padded to the batch's length: cut it
                ids = ids[: ids.index(eos) + 1]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out[req] = GenerationResult(text=text, token_ids=tuple(ids))
        return out

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def close(self) -> None:
        self._row_cache.clear()
        self._peft = None
        self._base_model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _finite_or_raise(logp: Any, view: View, prompt: str) -> Any:
    import torch

    if not bool(torch.isfinite(logp).all()):
        raise BackendError(
            f"view {view.key} produced non-finite logits on prompt {prompt[:40]!r}; "
            "the adapter or model is corrupt"
        )
    return logp


def _exact_divergence(la: Any, lb: Any, k: int, decode: Any) -> DivergenceResult:
    """JS and both KLs of two fp32 log-softmax rows, in fp64 with `stats` (the one
    implementation, shared with the MLX backend; identical rows give 0)."""
    a = la.double().cpu().numpy()
    b = lb.double().cpu().numpy()
    return DivergenceResult(
        js=stats.js(a, b),
        kl_b_a=stats.kl(b, a),
        kl_a_b=stats.kl(a, b),
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
