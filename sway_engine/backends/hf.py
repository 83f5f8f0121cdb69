"""HuggingFace/PEFT backend: one base model, every view a named LoRA adapter on it.

Rows of different views share one forward pass: sway's batched-LoRA row hook for plain
LoRA, else PEFT's per-row `adapter_names` (left padding, position ids rebuilt from the
attention mask). Divergences are exact over the full vocabulary from fp32 log-softmax rows.
What the hf and mlx backends share (batching, counters, the row cache, assembling results)
is `backends/local.py`; the LoRA layer surgery is `backends/hf_lora.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sway_engine import torch_env
from sway_engine.adapters import WEIGHTS, AdapterInfo, read_adapter
from sway_engine.backends.hf_cache import reserved_cache
from sway_engine.backends.hf_lora import (
    RowPlan,
    add_row_updates,
    add_slot,
    check_modules,
    fill_view,
    layers_take_config,
    lora_layers,
    module_weights,
    plain_linear,
    replace_cfg,
    row_plan,
    update_is_zero,
)
from sway_engine.backends.local import (
    Derived,
    LocalBackend,
    backend_digest,
    cut_at_eos,
    local_base,
)
from sway_engine.backends.rows import Row
from sway_engine.errors import AdapterError, BackendError
from sway_engine.requests import Generate, GenerationResult, ModuleWeights
from sway_engine.views import Finetuned, Null, View

if TYPE_CHECKING:
    import torch

    from sway_engine.score_cache import ScoreCache

BASE_NAME = "__base__"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
HF_LIBRARIES = ("torch", "transformers", "peft")
# Beside local.COUNTERS: decode steps computed for all rows of a batch, and the tokens rows
# kept (to EOS).
HF_COUNTERS = ("generate_row_steps", "generated_tokens")
GENERATE_MAX_ROWS = 2048  # per generate call, whatever the cache budget allows
# Rows that ended leave a decode batch once they are 1/COMPACT_AT of it (`_decode`).
COMPACT_AT = 8
# Decode steps whose attention reads of a padded position cost about one token's forward.
PAD_READS = 8


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


class HFBackend(LocalBackend):
    """Loads the base once; registers the trained adapter, nulls and scaled copies on it."""

    kind = "hf"
    BASE_ROW = BASE_NAME

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
        generate_cache_bytes: int = 1 << 30,
    ) -> None:
        torch, transformers, _ = _import_stack()
        self._torch = torch
        self.base_id = base
        self.device = _pick_device(torch, device)
        self.dtype = _pick_dtype(torch, dtype, self.device)
        self._setup(
            batch_tokens=batch_tokens,
            max_batch_rows=max_batch_rows,
            row_cache_bytes=row_cache_bytes,
            extra_counters=HF_COUNTERS,
        )
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
        # A decode step costs about the same for 64 rows as for 1000 on a small model, so
        # generation batches as many rows as the KV cache budget holds (`_generate_rows`).
        self.generate_cache_bytes = generate_cache_bytes
        self._kv_bytes_per_token = _kv_bytes_per_token(model.config, self.dtype)
        self.vocab_size = int(model.config.vocab_size)
        self._peft: Any = None
        self._ft_name = ""
        self._generation = 0
        self._names: dict[str, str] = {}  # view key -> PEFT adapter name
        self._layer_list: list[Any] | None = None
        self._names_cache: tuple[list[Any], dict[int, str]] | None = None
        self._views_made = 0
        self._row_plan: RowPlan | None = None  # the view of each row of the current pass
        # Layers carrying sway's row hook, by id; the layer is kept so its id stays unique.
        # A hook outlives adapter swaps (it reads the current plan), so it is added only once.
        self._hooked: dict[int, Any] = {}
        self._peft_active: bool | None = None  # PEFT's own LoRA path on (None: unknown)
        self._row_lora: bool | None = None  # batched LoRA usable (None: not checked yet)
        self._factors: dict[int, dict[Any, Any]] = {}
        self._zero: dict[str, bool] = {}  # adapter name -> its update is exactly zero
        self._base_weights: dict[str, np.ndarray] = {}  # module -> float32 W (AdapterWeights)
        if adapter is not None:
            self.load_adapter(str(adapter))

    # ---- adapters and views ----

    def _numerics(self) -> str:
        return hf_numerics(str(self.dtype), self.device)

    def _hub_revision(self) -> str | None:
        revision = getattr(self._base_model.config, "_commit_hash", None)
        return str(revision) if revision else None

    def _load_primary(self, path: str) -> AdapterInfo:
        info = self._read(path)
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
            raise self._misfit(info, exc) from exc
        self._peft.set_adapter(name)
        for old in [n for n in self._peft.peft_config if n != name]:
            self._peft.delete_adapter(old)
        self._peft.eval()
        self._ft_name = name
        self._names = {Finetuned().key: name}
        self._layers_changed()
        self._factors = {}
        return info

    def _load_extra(self, path: str, label: str) -> AdapterInfo:
        info = self._read(path)
        name = f"ft{self._generation}_{len(self.extra_adapters) + 1}"
        try:
            self._peft.load_adapter(str(info.path), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise self._misfit(info, exc) from exc
        self._peft.set_adapter(self._ft_name)
        self._peft.eval()
        self._names[Finetuned(label).key] = name
        self._layers_changed()  # another adapter may target modules the primary does not
        return info

    def _read(self, path: str) -> AdapterInfo:
        info = read_adapter(path)
        where = f"adapter {info.path} does not fit base {self.base_id!r}"
        check_modules(self._base_model, info.path / WEIGHTS, where)
        return info

    def _misfit(self, info: AdapterInfo, exc: Exception) -> AdapterError:
        return AdapterError(f"adapter {info.path} does not fit base {self.base_id!r}: {exc}")

    def _layers_changed(self) -> None:
        self._layer_list = None
        self._peft_active = None
        self._row_lora = None

    def _registered(self, key: str) -> bool:
        return key in self._names

    def _name_of(self, key: str) -> str:
        """A view whose update is exactly zero in every layer (a zero adapter, and so its
        norm-matched nulls) is the base: its rows are the base's rows, computed once."""
        name = self._names[key]
        zero = self._zero.get(name)
        if zero is None:
            zero = self._zero[name] = update_is_zero(self._torch, self._layers(), name)
        return BASE_NAME if zero else name

    def _register_views(self, views: list[Derived]) -> None:
        """New views are added as slots of the LoRA layers already on the model, not through
        PEFT's `add_adapter`, whose module scan and per-adapter bookkeeping grow with the
        number of adapters (100 views on the fixture: 51 s that way, 11 s through PEFT's
        `update_layer`, well under a second as plain slots; see `add_slot`).
        """
        fast = layers_take_config(self._layers()) or plain_linear(self._layers())
        made: list[tuple[Derived, str, list[Any]]] = []
        for view in views:
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
                src = self._names[Finetuned(view.adapter).key]
                names = self._layer_names() if isinstance(view, Null) else {}
                rslora = bool(getattr(self._peft.peft_config[src], "use_rslora", False))
                fill_view(self._torch, layers, view, name, src, names, rslora)
        if not fast:
            self._peft.set_adapter(self._ft_name)
            self._peft.eval()

    def _layers(self) -> list[Any]:
        """Every LoRA layer of the model (scanned once per set of trained adapters)."""
        if self._layer_list is None:
            self._layer_list = lora_layers(self._peft, self._ft_name)
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

    def _module_weights(self, view: Derived) -> list[ModuleWeights]:
        name = self._names[view.key]
        return module_weights(self._layers(), name, self._layer_names(), self._base_weights)

    # ---- execution ----

    def _named_max_len(self) -> int:
        """A local base's context length as `planned_identity` reads it from config.json (the
        files are in the name already): a loaded backend and a deferred session then name the
        same base alike, also where transformers knows the length by another key (GPT-2's
        `n_positions`). Rows are still cut to the model's own `max_len`."""
        return _max_len(self.base_id) if Path(self.base_id).expanduser().is_dir() else self.max_len

    def _left_padded(self, seqs: list[tuple[int, ...]]) -> tuple[Any, Any, int]:
        """Token ids and attention mask of `seqs`, left padded to the longest."""
        torch = self._torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        return ids, mask, width

    def _forward(self, batch: list[Row], last: bool) -> list[np.ndarray]:
        torch = self._torch
        logits, width = self._logits(batch, last)
        if last:
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu().numpy()
            return [logp[i] for i in range(len(batch))]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, row in enumerate(batch):
            n = len(row.ids)
            seq = logp[i, width - n : width - 1]
            nxt = torch.tensor(row.ids[1:], device=seq.device)
            out.append(seq.gather(-1, nxt[:, None])[:, 0].cpu().numpy().astype(np.float64))
        return out

    def _forward_dists(self, batch: list[Row]) -> list[Any]:
        """fp32 log-softmax at every position but the last, per row, left on the device."""
        torch = self._torch
        logits, width = self._logits(batch, False)
        return [
            torch.log_softmax(logits[i, width - len(row.ids) : width - 1].float(), dim=-1)
            for i, row in enumerate(batch)
        ]

    def _next_logprobs(self, dists: Any, ids: tuple[int, ...]) -> np.ndarray:
        nxt = self._torch.tensor(ids[1:], device=dists.device)
        return dists.gather(-1, nxt[:, None])[:, 0].cpu().numpy().astype(np.float64)

    def _token_kl(self, logp_a: Any, logp_b: Any) -> np.ndarray:
        """sum_v p_a (log p_a - log p_b) per position: fp32 terms summed in fp64 (>= 0)."""
        terms = logp_a.exp() * (logp_a - logp_b)
        kl = terms.sum(-1, dtype=self._torch.float64).cpu().numpy()
        return np.maximum(kl, 0.0)

    def _logits(self, batch: list[Row], last: bool) -> tuple[Any, int]:
        """One forward pass of a mixed-view batch (left padded): logits and padded width."""
        torch = self._torch
        ids, mask, width = self._left_padded([r.ids for r in batch])
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
                self._row_plan = self._plan_rows([r.adapter for r in batch])
                try:
                    logits = self._base_model(**kwargs).logits
                finally:
                    self._row_plan = None
            elif self._peft is not None:
                self._peft_lora(True)
                logits = self._peft(**kwargs, adapter_names=[r.adapter for r in batch]).logits
            else:
                logits = self._base_model(**kwargs).logits
        self._count_pass(batch)
        return logits, width

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

    def _plan_rows(self, names: list[str], slots: tuple[str, ...] = ()) -> RowPlan | None:
        return row_plan(self._torch, names, self.BASE_ROW, self.device, slots)

    def _row_hook(self, layer: Any, args: tuple[Any, ...], output: Any) -> Any:
        plan = self._row_plan
        if plan is None:
            return None
        table = self._factors.setdefault(id(layer), {})
        return add_row_updates(self._torch, layer, table, args[0], output, plan)

    # ---- generation ----

    def _generate_all(
        self, prompts: dict[Generate, tuple[int, ...]]
    ) -> dict[Generate, GenerationResult]:
        """Greedy generation from each request's prompt ids (fitted to the context by
        `rows.plan`). With batched LoRA available, rows of every view share one generate call
        (the row hook applies each row's adapter at every decode step); otherwise one PEFT
        generate per view. sway's decode loop takes rows of any length limit in one call (a
        row leaves at its own); transformers' `generate` takes one limit per call."""
        out: dict[Generate, GenerationResult] = {}
        reqs = list(prompts)
        mixed = self._peft is not None and bool(reqs) and self._row_lora_ready()
        plain = (self._peft is None or mixed) and self._plain_greedy(self._base_model)
        groups: dict[tuple[str, int], list[Generate]] = {}
        # Views computed under one name (a zero update is the base) generate once.
        first: dict[tuple[str, str, int], Generate] = {}
        same: list[tuple[Generate, Generate]] = []
        for req in reqs:
            name = self._row_name(req.view)
            key = (req.prompt, name, req.max_new_tokens)
            if key in first:
                same.append((req, first[key]))
                continue
            first[key] = req
            limit = 0 if plain else req.max_new_tokens
            groups.setdefault(("" if mixed else name, limit), []).append(req)
        if self._peft is not None and reqs and not mixed:
            self._peft_lora(True)
        for group in groups.values():
            for chunk in self._generate_chunks(group, prompts):
                out.update(self._generate_chunk(chunk, prompts, mixed))
        for req, twin in same:
            out[req] = out[twin]
        return out

    def _generate_chunks(
        self, group: list[Generate], prompts: dict[Generate, tuple[int, ...]]
    ) -> Iterator[list[Generate]]:
        """`group` cut into generate calls of prompts of similar length, longest first.

        Left padding costs a prompt token's compute in the prefill (one call for the fixture
        battery's 949 rows padded 53,564 prompt tokens to 151,840); another call costs its
        decode steps, each about `pad_tokens_per_pass` tokens of compute. A call takes rows
        while the padding they add stays under its steps' worth of tokens, and as many rows
        as `_generate_rows` allows. In a call, rows of one view are contiguous."""
        order = sorted(group, key=lambda g: -len(prompts[g]))
        steps = max(g.max_new_tokens for g in order)
        # a padded position: its prefill token, then read at every step's attention
        budget = steps * (self.pad_tokens_per_pass or 1) / (1 + steps / PAD_READS)
        chunk: list[Generate] = []
        cap = padding = 0
        for req in order:
            pad = len(prompts[chunk[0]]) - len(prompts[req]) if chunk else 0
            if chunk and (len(chunk) >= cap or padding + pad > budget):
                yield sorted(chunk, key=lambda g: self._row_name(g.view))
                chunk, padding, pad = [], 0, 0
            if not chunk:
                cap = self._generate_rows(len(prompts[req]) + steps)
            chunk.append(req)
            padding += pad
        if chunk:
            yield sorted(chunk, key=lambda g: self._row_name(g.view))

    def _generate_rows(self, length: int) -> int:
        """Rows per generate call: as many sequences of `length` tokens as the KV cache budget
        holds, at most GENERATE_MAX_ROWS (and at least max_batch_rows)."""
        fits = self.generate_cache_bytes // max(1, self._kv_bytes_per_token * length)
        return max(self.max_batch_rows, min(GENERATE_MAX_ROWS, int(fits)))

    def _generate_chunk(
        self,
        chunk: list[Generate],
        prompts: dict[Generate, tuple[int, ...]],
        mixed: bool,
    ) -> dict[Generate, GenerationResult]:
        torch = self._torch
        limits = [g.max_new_tokens for g in chunk]
        input_ids, mask, _ = self._left_padded([prompts[g] for g in chunk])
        names = [self._row_name(g.view) for g in chunk]
        kwargs: dict[str, Any] = {}
        model = self._base_model
        if self._peft is not None and not mixed:
            model = self._peft
            kwargs["adapter_names"] = names
        with torch.inference_mode():
            if self._plain_greedy(model):
                rows = self._decode(
                    model, input_ids.to(self.device), mask.to(self.device), names, limits, mixed
                )
            else:  # one limit: _generate_all groups by it for generate
                rows = self._hf_generate(model, input_ids, mask, names, limits[0], mixed, kwargs)
        out: dict[Generate, GenerationResult] = {}
        for req, row in zip(chunk, rows, strict=True):
            ids = cut_at_eos(row, self._stop_ids())
            self._counters["generated_tokens"] += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out[req] = GenerationResult(text=text, token_ids=tuple(ids))
        return out

    def _stop_ids(self) -> set[int]:
        """Tokens that end a row: the tokenizer's EOS and the generation config's."""
        stops = {int(self.tokenizer.eos_token_id)}
        eos = getattr(self._base_model.generation_config, "eos_token_id", None)
        if eos is not None:
            stops.update(int(i) for i in ([eos] if isinstance(eos, int) else eos))
        return stops

    def _plain_greedy(self, model: Any) -> bool:
        """True where greedy decoding is argmax of the logits: the base model's forward (the
        row hook applies views) and a generation config with no logits processor that
        `generate` would apply (repetition penalty, banned words, forced tokens...)."""
        if model is not self._base_model:
            return False
        cfg = self._base_model.generation_config
        neutral = {
            "repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0),
            "encoder_no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,),
            "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,),
            "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,),
            "sequence_bias": (None,),
            "min_new_tokens": (None, 0),
            "min_length": (None, 0),
            "renormalize_logits": (None, False),
        }
        return all(getattr(cfg, k, None) in ok for k, ok in neutral.items())

    def _decode(
        self,
        model: Any,
        input_ids: Any,
        mask: Any,
        names: list[str],
        limits: list[int],
        mixed: bool,
    ) -> list[list[int]]:
        """Greedy decoding with the KV cache (room reserved for the whole generation), rows
        leaving the batch after their end of sequence. A row that ended is dropped once
        ended rows are 1/COMPACT_AT of the batch: dropping copies the cache, which costs
        several steps of the row's compute, so rows leave in groups (`generate` keeps every
        row until the last one ends: 2.0x the row-steps needed on the fixture battery). Per
        row, the arithmetic of generate's greedy search: argmax of the last position's
        logits. Row i stops at its EOS or after limits[i] tokens."""
        torch = self._torch
        max_new = max(limits)
        stops = torch.tensor(sorted(self._stop_ids()), device=input_ids.device)
        count, width = int(input_ids.shape[0]), int(input_ids.shape[1])
        out: list[list[int]] = [[] for _ in range(count)]
        cache = reserved_cache(model.config, width + max_new)
        full = torch.cat([mask, mask.new_ones((count, max_new))], dim=-1)  # every step's mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = list(range(count))  # batch row -> request row
        live = [True] * count
        step_ids, step_pos = input_ids, pos
        slots = tuple(dict.fromkeys(n for n in names if n != self.BASE_ROW))
        for step in range(max_new):
            self._row_plan = self._plan_rows([names[r] for r in rows], slots) if mixed else None
            try:
                logits = model(
                    input_ids=step_ids,
                    attention_mask=full[:, : width + step],
                    position_ids=step_pos,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits
            finally:
                self._row_plan = None
            self._counters["forward_passes"] += 1
            self._counters["generate_row_steps"] += len(rows)
            nxt = logits[:, -1, :].argmax(-1)
            ended = torch.isin(nxt, stops).tolist()
            for b, tok in enumerate(nxt.tolist()):
                if live[b]:
                    row = out[rows[b]]
                    row.append(int(tok))
                    live[b] = not ended[b] and len(row) < limits[rows[b]]
            alive = sum(live)
            if step == max_new - 1 or alive == 0:
                break
            if (len(rows) - alive) * COMPACT_AT >= len(rows):
                keep = torch.tensor([b for b, on in enumerate(live) if on], device=nxt.device)
                cache.batch_select_indices(keep)
                rows = [rows[b] for b in keep.tolist()]
                live = [True] * len(rows)
                nxt, full, pos = nxt[keep], full[keep], pos[keep]
            pos = pos[:, -1:] + 1
            step_ids, step_pos = nxt[:, None], pos
        return out

    def _hf_generate(
        self,
        model: Any,
        input_ids: Any,
        mask: Any,
        names: list[str],
        max_new: int,
        mixed: bool,
        kwargs: dict[str, Any],
    ) -> list[list[int]]:
        """transformers' generate (PEFT's per-view path, or a generation config with logits
        processors): every row runs until the last one ends."""
        width = int(input_ids.shape[1])
        self._row_plan = self._plan_rows(names) if mixed else None
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
        steps = int(gen.shape[1]) - width  # generate stops early when every row ended
        self._counters["forward_passes"] += steps
        self._counters["generate_row_steps"] += steps * len(names)
        return [[int(i) for i in row] for row in gen[:, width:].cpu()]

    def _release(self) -> None:
        self._base_weights = {}
        self._peft = None
        self._base_model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 32)
    hidden = int(getattr(config, "hidden_size", 0) or 4096)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    size = 2 if "16" in str(dtype) else 4
    return 2 * layers * kv_heads * head_dim * size


def hf_numerics(dtype: str, device: str) -> str:
    """What the hf backend's numbers depend on besides the weights: library versions (read
    from the installed packages, not imported), dtype and device."""
    return f"{torch_env.versions(*HF_LIBRARIES)} dtype={dtype} device={device}"


def planned_identity(base: str, dtype: str, device: str, cache: ScoreCache) -> str | None:
    """The persistent cache's name of `HFBackend(base, dtype=, device=)`, without loading it
    (`backends.deferred`): None for a hub model (its revision is known once loaded) or a
    dtype the backend refuses. torch is imported only where the device or dtype "auto"
    resolves to depends on the hardware (a torch build with GPU libraries, or macOS)."""
    where = local_base(base, cache)
    if where is None or (dtype != "auto" and dtype not in DTYPE_NAMES):
        return None
    if device == "auto" and torch_env.cpu_only():
        device = "cpu"
    if device == "cpu" or (device != "auto" and dtype != "auto"):
        dtype_name = "torch.float32" if dtype == "auto" else f"torch.{DTYPE_NAMES[dtype]}"
    else:
        import torch

        device = _pick_device(torch, device)
        dtype_name = str(_pick_dtype(torch, dtype, device))
    return backend_digest(HFBackend.kind, hf_numerics(dtype_name, device), _max_len(base), where)


def _max_len(base: str) -> int:
    """The context length a local base's config.json names `max_position_embeddings` (2048
    without one), for the cache's name only: a loaded `HFBackend` names its base with this
    too (`_named_max_len`), whatever key its config uses."""
    try:
        config = json.loads((Path(base).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value or 2048)


def _pick_device(torch: Any, device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _pick_dtype(torch: Any, dtype: str, device: str) -> torch.dtype:
    if dtype in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[dtype])
    if dtype != "auto":
        raise BackendError(f"dtype {dtype!r} is not one of auto, fp32, fp16, bf16")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "mps":
        return torch.float16
    return torch.float32
