"""LoRA layer surgery for the HF backend: derived views as plain slots on PEFT's LoRA layers,
and the batched row update that applies every view's factors to its block of a batch.

PEFT's own mixed-batch path loops over every adapter in every layer; these functions do the
same arithmetic per block of rows (DESIGN.md, "Scoring forwards bypass PEFT's LoRA path").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sway_engine.errors import BackendError
from sway_engine.requests import ModuleWeights
from sway_engine.views import Finetuned, Null, Scaled, View


def plain_linear(layers: list[Any], src: str | None = None) -> bool:
    """True when every layer's LoRA (of `src`, else of all adapters) is plain nn.Linear A, B.

    Plain LoRA (no DoRA or other variant, no bias on B) is what `add_slot` can register.
    """
    import torch

    linear = torch.nn.Linear
    for layer in layers:
        names = [src] if src is not None else list(layer.lora_A)
        for n in names:
            if not (
                isinstance(layer.lora_A[n], linear)
                and isinstance(layer.lora_B[n], linear)
                and layer.lora_B[n].bias is None
                and n not in getattr(layer, "lora_variant", {})
            ):
                return False
    return bool(layers)


def add_slot(torch: Any, layer: Any, src: str, name: str, r: int, rslora: bool) -> None:
    """Register LoRA adapter `name` (rank r, src's alpha) on one layer, weights left unset.

    Sets exactly what PEFT's mixed-batch forward and `delete_adapter` read: the A and B
    modules (`_fill` overwrites their default init), a no-op dropout (inference),
    r, alpha and scaling. O(1) per layer, where `update_layer` revisits every adapter.
    """
    nn = torch.nn
    like = layer.lora_A[src].weight
    kw = {"device": like.device, "dtype": like.dtype, "bias": False}
    a = nn.Linear(layer.lora_A[src].in_features, r, **kw)  # (skip_init is 10x slower)
    b = nn.Linear(r, layer.lora_B[src].out_features, **kw)
    for module in (a, b):
        module.train(False)
        module.requires_grad_(False)
    alpha = layer.lora_alpha[src]
    layer.r[name] = r
    layer.lora_alpha[name] = alpha
    layer.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
    layer.lora_dropout[name] = nn.Identity()
    layer.lora_A[name] = a
    layer.lora_B[name] = b
    for attr, value in (("use_rslora", rslora), ("use_dora", False), ("lora_bias", False)):
        table = getattr(layer, attr, None)
        if isinstance(table, dict):
            table[name] = value


@dataclass(frozen=True)
class RowPlan:
    """Which LoRA view each row of one forward pass takes, prepared once for every layer.

    `slots` are the views of the batch (base rows take none). Rows of slot g are copied from
    `src` to positions `dest` of a (slots x width) padded block, so one pair of batched
    matmuls serves every view in every layer however many rows each has (rows leave a decode
    batch at their end of sequence; base rows sit between views). `src` is None when the
    batch already is that block: equal runs of rows per slot, in slot order, no base row.
    """

    slots: tuple[str, ...]
    width: int
    src: Any = None
    dest: Any = None


def row_plan(
    torch: Any, names: list[str], base: str, device: Any, slots: tuple[str, ...] = ()
) -> RowPlan | None:
    """The plan for rows computed under `names` (`base`: no update); `slots` fixes the views'
    order (a decode loop keeps its chunk's views while rows leave). None: no row takes an
    update."""
    slots = slots or tuple(dict.fromkeys(n for n in names if n != base))
    if not slots:
        return None
    index = {name: g for g, name in enumerate(slots)}
    counts = [0] * len(slots)
    for name in names:
        if name != base:
            counts[index[name]] += 1
    width = max(counts)
    if width == 0:
        return None
    src: list[int] = []
    dest: list[int] = []
    seen = [0] * len(slots)
    for row, name in enumerate(names):
        if name == base:
            continue
        g = index[name]
        src.append(row)
        dest.append(g * width + seen[g])
        seen[g] += 1
    if src == dest and len(src) == len(names) == len(slots) * width:
        return RowPlan(slots, width)
    as_index = {"dtype": torch.long, "device": device}
    return RowPlan(slots, width, torch.tensor(src, **as_index), torch.tensor(dest, **as_index))


_STACK = ("stacked",)  # the table key of a layer's current stack (names are strings)


def _stacked(torch: Any, layer: Any, table: dict[Any, Any], slots: tuple[str, ...]) -> Any:
    """(A, B) of `slots` on this layer stacked: (G, in, r) and (G, r, out), the scaling in B,
    ranks zero-padded to the largest, zeros for a view this layer does not adapt; None when
    it adapts none. One stack is kept per layer: consecutive passes (a decode loop) share it."""
    kept = table.get(_STACK)
    if kept is not None and kept[0] == slots:
        return kept[1]
    present = [name for name in slots if name in layer.lora_A]
    if not present:
        table[_STACK] = (slots, None)
        return None
    like = layer.lora_A[present[0]].weight
    rank = max(int(layer.lora_A[name].weight.shape[0]) for name in present)
    a_all = like.new_zeros((len(slots), like.shape[1], rank))
    b_all = like.new_zeros((len(slots), rank, layer.lora_B[present[0]].weight.shape[0]))
    for g, name in enumerate(slots):
        if name in layer.lora_A:
            a = layer.lora_A[name].weight  # (r, in)
            b = layer.lora_B[name].weight  # (out, r)
            a_all[g, :, : a.shape[0]] = a.T
            b_all[g, : a.shape[0], :] = b.T * float(layer.scaling[name])
    table[_STACK] = (slots, (a_all, b_all))
    return a_all, b_all


def add_row_updates(
    torch: Any, layer: Any, table: dict[Any, Any], x: Any, out: Any, plan: RowPlan
) -> Any:
    """out[row] += scaling * B A x[row] for each row under a view this layer adapts.

    Base rows and views that do not target this layer are left as they are. The same
    arithmetic as PEFT's, as two batched matmuls over the plan's padded block instead of
    two matmuls per view: at a decode step the Python dispatch is most of the cost.
    """
    stacked = _stacked(torch, layer, table, plan.slots)
    if stacked is None:
        return out
    a_all, b_all = stacked
    groups = len(plan.slots)
    if plan.src is None:
        block = x
    else:
        block = x.new_zeros((groups * plan.width, *x.shape[1:]))
        block.index_copy_(0, plan.dest, x.index_select(0, plan.src))
    flat = block.reshape(groups, -1, x.shape[-1]).to(a_all.dtype)
    d = torch.bmm(torch.bmm(flat, a_all), b_all)
    d = d.reshape(groups * plan.width, *out.shape[1:]).to(out.dtype)
    if plan.src is None:
        out.add_(d)
    else:
        out.index_add_(0, plan.src, d.index_select(0, plan.dest))
    return out


def layers_take_config(layers: list[Any]) -> bool:
    """True when this PEFT's LoraLayer.update_layer takes a LoraConfig (peft >= 0.18)."""
    if not layers:
        return False
    import inspect

    return "config" in inspect.signature(layers[0].update_layer).parameters


def replace_cfg(cfg: Any, view: View) -> Any:
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


def check_modules(model: Any, weights_path: Any, where: str) -> None:
    """Every module the adapter's tensors name must exist in the base. PEFT only warns about
    keys it cannot place, and an adapter whose keys were renamed on export (model.layers ->
    model.blocks) then runs as the base and is scored as "did nothing"."""
    from safetensors import safe_open

    from sway_engine.errors import AdapterError
    from sway_engine.nulls import PEFT_PREFIX

    with safe_open(str(weights_path), "np") as weights:
        keys = list(weights.keys())
    wanted = {k.split(".lora_")[0].removeprefix(PEFT_PREFIX) for k in keys if ".lora_" in k}
    have = {n for n, _ in model.named_modules()}
    missing = sorted(m for m in wanted if m not in have)
    if missing or not wanted:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise AdapterError(
            f"{where}: "
            + (f"no module {shown} in the base" if missing else "no LoRA tensors")
            + " (keys renamed on export, or the adapter belongs to another model)"
        )


def lora_layers(model: Any, trained: str) -> list[Any]:
    """Every PEFT LoRA layer of `model`; LoRA on embeddings cannot carry derived views."""
    from peft.tuners.lora import LoraLayer

    from sway_engine.errors import AdapterError

    layers = [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if trained in getattr(layer, "lora_embedding_A", {}):
            raise AdapterError("LoRA on embedding layers is not supported for derived views")
    return layers


def update_is_zero(torch: Any, layers: list[Any], name: str) -> bool:
    """True when adapter `name`'s B (or A) factor is all zeros in every layer it adapts."""
    with torch.no_grad():
        for layer in layers:
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if bool(torch.any(a != 0)) and bool(torch.any(b != 0)):
                return False
    return True


def fill_view(
    torch: Any,
    layers: list[Any],
    view: View,
    name: str,
    src: str,
    names: dict[int, str],
    rslora: bool,
) -> None:
    """Write a derived view's LoRA weights into slot `name`: a scaled copy of trained adapter
    `src`, or a seeded null from `sway_engine.nulls` (seeded per module name, so every backend
    draws the same null weights from the same trained adapter). `names`: module name by id."""
    from sway_engine import nulls

    for layer in layers:
        a_ft, b_ft = layer.lora_A[src].weight, layer.lora_B[src].weight
        a_new, b_new = layer.lora_A[name].weight, layer.lora_B[name].weight
        if isinstance(view, Scaled):
            a_new.copy_(a_ft)
            b_new.copy_(b_ft * view.lam)
            continue
        assert isinstance(view, Null)
        w = nulls.null_lora(
            a_ft.detach().float().cpu().numpy(),
            b_ft.detach().float().cpu().numpy(),
            float(layer.scaling[src]),
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


def module_weights(
    layers: list[Any], name: str, names: dict[int, str], bases: dict[str, Any]
) -> list[ModuleWeights]:
    """`ModuleWeights` of every layer adapter `name` adapts: the factors in its slot (what the
    forward pass reads) and the base layer's weight as float32 (out, in). `names`: module name
    by id; `bases` caches the base weights by module name (they never change): read-only
    arrays that share the tensor's memory where it is float32 on the CPU."""
    from sway_engine.nulls import module_key

    out = []
    for layer in layers:
        if name not in layer.lora_A:
            continue
        module = module_key(names[id(layer)])
        if not plain_linear([layer], name):
            raise BackendError(
                f"{module}: adapter weights are read from plain linear LoRA only "
                "(no DoRA, no bias on B, no embedding or convolution LoRA)"
            )
        weight = bases.get(module)
        if weight is None:
            base = layer.get_base_layer().weight.detach()
            if not base.is_floating_point():
                raise BackendError(
                    f"{module}: the base weight is quantized ({base.dtype}); load the base "
                    "unquantized to read its weights"
                )
            if getattr(layer, "fan_in_fan_out", False):
                base = base.T
            weight = base.float().cpu().numpy()
            weight.flags.writeable = False
            bases[module] = weight
        out.append(
            ModuleWeights(
                name=module,
                weight=weight,
                a=layer.lora_A[name].weight.detach().float().cpu().numpy().copy(),
                b=layer.lora_B[name].weight.detach().float().cpu().numpy().copy(),
                scaling=float(layer.scaling[name]),
            )
        )
    return out
