"""Pruning: magnitude scores and masks (unstructured), and the physical removal of attention heads and
feed-forward neurons from a :class:`~common.models.decoder.DecoderLM` (structured).

Unstructured pruning zeroes single weights; the matrices keep their shape::

    masks = global_magnitude_masks(linear_weights(model), sparsity=0.5)   # {name: bool keep-mask}
    apply_masks(model, masks)                                              # those weights become 0

:func:`global_magnitude_masks` ranks every weight of every listed matrix together (the smallest
``|w|`` go first, some layers lose more than others), :func:`layer_magnitude_masks` gives each matrix
the same sparsity. Both pick exactly what ``torch.nn.utils.prune``'s ``L1Unstructured`` picks.
Wanda (Sun et al., 2023) scores a weight by ``|W_ij| · ‖X_j‖₂`` over calibration tokens and prunes within
each output row (:func:`wanda_scores`, :func:`wanda_prune`); :func:`n_m_mask` keeps the 2 best of every 4
consecutive inputs (2:4 semi-structured sparsity) by either score.

Structured pruning removes whole units, so the model really gets smaller::

    heads = head_scores(model)                       # (n_layer, n_head) importance
    neurons = neuron_scores(model)                   # [(d_ff,) per layer]
    small = prune_model(model, lowest(heads, 4), lowest_per_layer(neurons, 0.5))

A head is its rows of the fused q/k/v projection plus its columns of the output projection (with
grouped KV heads the unit is a KV group: one key/value head and the query heads that share it); a
feed-forward neuron is its row of the first matrix (SwiGLU: its gate row and its up row) plus its
column of the second. Removing them gives the same outputs as the original model with them zeroed
(:func:`zero_units`), to rounding. Layers may end with different head counts and widths; the returned
model is a :class:`PrunedDecoderLM`, whose ``new_kv_cache`` sizes each layer's cache to its own heads;
:func:`pruned_like` rebuilds its shapes from ``shape_summary()`` for loading saved weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from common.calibration import block_inputs, block_linears, layer_inputs, run_block
from common.models.decoder import DecoderLM
from common.models.feedforward import MLP, SwiGLU
from common.progress import progress_if

# ----------------------------------------------------------------------------- unstructured


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` if it lies in [0, 1), else ValueError (1 would remove every weight)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """The importance of each weight by magnitude: ``|w|`` (the L1 criterion of Han et al., 2015)."""
    return weight.detach().abs()


def linear_weights(model: nn.Module, include_head: bool = False) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of the model's ``nn.Linear`` layers, the matrices pruning usually targets.

    The output head is left out unless ``include_head`` (it is often tied to the embedding, and the
    token embedding is not a matrix product's weight). Shared weights appear once.
    """
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    head = getattr(model, "lm_head", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (include_head or m is not head) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            found[f"{name}.weight"] = m.weight
    return found


def _keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask that is False at the ``n_prune`` smallest scores (flattened)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        mask[torch.topk(scores.flatten(), n_prune, largest=False).indices] = False
    return mask


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) that prune ``round(sparsity · total)`` weights with the smallest
    magnitude across all of ``weights`` together."""
    check_sparsity(sparsity)
    if not weights:
        raise ValueError("no weights to prune")
    scores = torch.cat([magnitude_scores(w).flatten() for w in weights.values()])
    flat = _keep_mask(scores, round(sparsity * scores.numel()))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = flat[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def layer_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks that prune the same fraction, ``sparsity``, of every matrix by magnitude."""
    check_sparsity(sparsity)
    return {
        name: _keep_mask(magnitude_scores(w), round(sparsity * w.numel())).view_as(w)
        for name, w in weights.items()
    }


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance (Sun et al., 2023): ``|W_ij| · ‖X_j‖₂``, the weight's magnitude times the L2 norm
    of its input feature ``j`` over the calibration tokens. ``weight`` is (out, in), ``input_norm`` (in,)."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},), got {tuple(input_norm.shape)}")
    return magnitude_scores(weight) * input_norm.to(weight.device, torch.float32).view(1, -1)


def input_norms(x: torch.Tensor) -> torch.Tensor:
    """(in,) L2 norm of each input feature over the rows of a (tokens, in) calibration input."""
    return x.detach().float().reshape(-1, x.shape[-1]).norm(dim=0)


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that prunes the ``round(sparsity · in)`` lowest scores of every output row (Wanda
    compares weights within a row: each output keeps the same number of inputs)."""
    check_sparsity(sparsity)
    n_prune = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        mask.scatter_(1, torch.topk(scores, n_prune, dim=1, largest=False).indices, False)
    return mask


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Semi-structured N:M keep-mask: in every group of ``m`` consecutive weights along the input
    dimension of a (out, in) score matrix, keep the ``n`` highest scores (2:4, 50% sparsity, is the
    pattern sparse tensor cores run). ValueError when ``in`` is not a multiple of ``m``."""
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m for N:M sparsity, got {n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs an input width divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in / m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def magnitude_n_m_masks(weights: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """N:M keep-masks of every matrix by magnitude (:func:`n_m_mask` of ``|w|``)."""
    return {name: n_m_mask(magnitude_scores(w), n, m) for name, w in weights.items()}


@torch.no_grad()
def wanda_prune(
    model: nn.Module,
    windows: torch.Tensor,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Wanda on every block linear of a DecoderLM: ``(pruned copy, {parameter name: keep-mask})``.

    As in the paper's reference code, block by block: the block's linears see the calibration
    ``windows`` (n, seq) as the already-pruned blocks before it hand them on
    (:func:`common.calibration.block_inputs`, :func:`common.calibration.layer_inputs`), each weight is
    scored by :func:`wanda_scores`, and each output row loses its ``sparsity`` lowest (or, with
    ``n_m=(2, 4)``, keeps its 2 best of every 4 inputs); then the pruned block's outputs feed the next
    block.
    ``model`` itself is not changed.
    """
    check_sparsity(sparsity)
    model = copy.deepcopy(model).eval()
    for i, block in enumerate(model.blocks):  # a bad width ends here, before any work
        for name, lin in block_linears(block):
            if n_m is not None and lin.in_features % n_m[1]:
                raise ValueError(
                    f"{n_m[0]}:{n_m[1]} sparsity needs input widths divisible by {n_m[1]}; "
                    f"blocks.{i}.{name} has {lin.in_features}"
                )
    inputs = block_inputs(model, windows)
    masks = {}
    for i, block in enumerate(progress_if(model.blocks, "Wanda blocks", progress)):
        linears = block_linears(block)
        seen = layer_inputs(block, inputs, [name for name, _ in linears])  # {name: (tokens, in)}
        for name, lin in linears:
            scores = wanda_scores(lin.weight, input_norms(seen[name]))
            mask = n_m_mask(scores, *n_m) if n_m is not None else row_masks(scores, sparsity)
            lin.weight.mul_(mask.to(lin.weight.dtype))
            masks[f"blocks.{i}.{name}.weight"] = mask
        inputs = run_block(block, inputs)  # the next block sees this block pruned
    return model, masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights of ``model`` (by parameter name) where the mask is False."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"{name!r} is not a parameter of the model")
        params[name].mul_(mask.to(params[name].dtype))


def sparsity_of(weights: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over all the given tensors."""
    zeros = total = 0
    for w in weights:
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


# ----------------------------------------------------------------------------- structured: units


def _dense_blocks(model: DecoderLM):
    if not isinstance(model, DecoderLM):
        raise TypeError(f"structured pruning works on a DecoderLM, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if not isinstance(block.ffn, (MLP, SwiGLU)):
            raise ValueError(
                f"layer {i} has a {type(block.ffn).__name__} feed-forward; only dense ones prune"
            )
    return model.blocks


def _head_rows(attn, unit: int) -> tuple[list[int], list[int]]:
    """Rows of ``attn.qkv`` and columns of ``attn.proj`` that belong to unit ``unit`` (a head, or with
    grouped KV heads a KV group): queries first, then the key and the value head."""
    h, kv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    group = h // kv  # query heads per KV head
    q_heads = range(unit * group, (unit + 1) * group)
    q_rows = [r for q in q_heads for r in range(q * hd, (q + 1) * hd)]
    k_rows = list(range((h + unit) * hd, (h + unit + 1) * hd))
    v_rows = list(range((h + kv + unit) * hd, (h + kv + unit + 1) * hd))
    return q_rows + k_rows + v_rows, q_rows


def n_head_units(attn) -> int:
    """Removable attention units of one layer: heads (MHA), or KV groups (GQA/MQA)."""
    return attn.n_kv_head


def _ffn_matrices(ffn) -> tuple[nn.Linear, nn.Linear, int]:
    """(first matrix, second matrix, hidden width) of a dense feed-forward."""
    if isinstance(ffn, SwiGLU):
        return ffn.gate_up, ffn.down, ffn.d_ff
    return ffn.fc, ffn.proj, ffn.fc.out_features


def _neuron_rows(ffn, neurons: torch.Tensor) -> torch.Tensor:
    """Rows of the first matrix that belong to ``neurons`` (SwiGLU: the gate row and the up row)."""
    _, _, d_ff = _ffn_matrices(ffn)
    return torch.cat([neurons, neurons + d_ff]) if isinstance(ffn, SwiGLU) else neurons


# ----------------------------------------------------------------------------- structured: scores


@torch.no_grad()
def head_scores(model: DecoderLM) -> torch.Tensor:
    """(n_layer, units) magnitude importance: the L2 norm of each head's (or KV group's) q/k/v rows and
    output-projection columns together."""
    rows = []
    for block in _dense_blocks(model):
        attn = block.attn
        scores = []
        for u in range(n_head_units(attn)):
            qkv_rows, proj_cols = _head_rows(attn, u)
            w = torch.cat([attn.qkv.weight[qkv_rows].flatten(), attn.proj.weight[:, proj_cols].flatten()])
            scores.append(w.float().norm())
        rows.append(torch.stack(scores))
    return torch.stack(rows)


@torch.no_grad()
def neuron_scores(model: DecoderLM) -> list[torch.Tensor]:
    """Per layer, (d_ff,) magnitude importance: the L2 norm of each neuron's input row(s) and output
    column together."""
    out = []
    for block in _dense_blocks(model):
        first, second, d_ff = _ffn_matrices(block.ffn)
        w_in = first.weight.float().square()
        rows = w_in[:d_ff] + w_in[d_ff:] if isinstance(block.ffn, SwiGLU) else w_in
        out.append((rows.sum(dim=1) + second.weight.float().square().sum(dim=0)).sqrt())
    return out


@torch.no_grad()
def activation_scores(model: DecoderLM, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Activation-based importance on calibration ``batches`` of token ids (batch, seq):

    - a head's score is the mean L2 norm of what it adds to the residual stream, ``W_o[:, head] · y_head``;
    - a neuron's score is the mean of ``|h_j| · ||W_2[:, j]||`` (its activation times its output weight).

    Returns ``(head scores (n_layer, units), [neuron scores (d_ff,) per layer])`` like
    :func:`head_scores` and :func:`neuron_scores`.
    """
    blocks = _dense_blocks(model)
    head_sum = [torch.zeros(n_head_units(b.attn)) for b in blocks]
    neuron_sum = [torch.zeros(_ffn_matrices(b.ffn)[2]) for b in blocks]
    count = [0]

    def attn_hook(i):
        def hook(proj, inputs):
            attn = blocks[i].attn
            y = inputs[0].float()  # (batch, seq, heads * head_dim)
            for u in range(n_head_units(attn)):
                _, cols = _head_rows(attn, u)
                part = y[..., cols] @ proj.weight[:, cols].float().T  # (batch, seq, d_model)
                head_sum[i][u] += part.norm(dim=-1).sum().cpu()

        return hook

    def ffn_hook(i):
        def hook(second, inputs):
            h = inputs[0].float().abs().flatten(0, -2)  # (tokens, d_ff)
            neuron_sum[i] += (h.sum(dim=0) * second.weight.float().norm(dim=0)).cpu()

        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.attn.proj.register_forward_pre_hook(attn_hook(i)))
        handles.append(_ffn_matrices(b.ffn)[1].register_forward_pre_hook(ffn_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x.to(model.lm_head.weight.device))
            count[0] += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not count[0]:
        raise ValueError("activation_scores needs at least one calibration batch")
    return torch.stack(head_sum) / count[0], [s / count[0] for s in neuron_sum]


def lowest(scores: torch.Tensor, n: int) -> dict[int, list[int]]:
    """The ``n`` lowest-scoring units over all layers of a (n_layer, units) score table, as
    ``{layer: [unit, ...]}`` (global ranking, so layers may lose different numbers)."""
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot pick {n} of {scores.numel()} units")
    order = torch.argsort(scores.flatten())[:n].tolist()
    picked: dict[int, list[int]] = {}
    for idx in order:
        picked.setdefault(idx // scores.shape[1], []).append(idx % scores.shape[1])
    return {k: sorted(v) for k, v in sorted(picked.items())}


def lowest_per_layer(scores: list[torch.Tensor] | torch.Tensor, fraction: float) -> dict[int, list[int]]:
    """The lowest ``round(fraction · units)`` units of every layer, as ``{layer: [unit, ...]}``."""
    check_sparsity(fraction)
    out = {}
    for i, s in enumerate(scores):
        n = round(fraction * s.numel())
        if n:
            out[i] = sorted(torch.argsort(s)[:n].tolist())
    return out


# ----------------------------------------------------------------------------- structured: removal


class PrunedDecoderLM(DecoderLM):
    """A DecoderLM whose layers may have different head counts and feed-forward widths after pruning.

    Everything works as in DecoderLM (forward, training, :func:`common.models.generation.generate`);
    ``new_kv_cache`` sizes each layer's cache to that layer's KV heads. It has no Llama equivalent (a
    Llama config has one head count and one width for all layers).
    """

    def new_kv_cache(self, batch: int, max_len: int | None = None):
        cache = super().new_kv_cache(batch, max_len)
        for i, block in enumerate(self.blocks):
            shape = (batch, block.attn.n_kv_head, cache.max_len, block.attn.head_dim)
            cache.k[i] = cache.k[i].new_empty(shape)
            cache.v[i] = cache.v[i].new_empty(shape)
        return cache

    def shape_summary(self) -> dict:
        """``{"heads": [per layer], "d_ff": [per layer]}``."""
        return {
            "heads": [b.attn.n_head for b in self.blocks],
            "d_ff": [_ffn_matrices(b.ffn)[2] for b in self.blocks],
        }


def _check_units(name: str, picked: dict[int, list[int]], n_layer: int, available) -> None:
    for layer, units in picked.items():
        if not 0 <= layer < n_layer:
            raise ValueError(f"{name}: layer {layer} does not exist (the model has {n_layer})")
        n = available(layer)
        bad = [u for u in units if not 0 <= u < n]
        if bad:
            raise ValueError(f"{name}: layer {layer} has {n} units, got {bad}")
        if len(set(units)) >= n:
            raise ValueError(f"{name}: removing {len(set(units))} of {n} in layer {layer} would leave none")


def _slice_linear(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new nn.Linear with only the given output rows and/or input columns of ``linear``."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def _complement(n: int, removed: Iterable[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(removed)] = False
    return keep.nonzero().flatten()


def prune_model(
    model: DecoderLM,
    heads: dict[int, list[int]] | None = None,
    neurons: dict[int, list[int]] | None = None,
) -> PrunedDecoderLM:
    """A physically smaller copy of ``model`` without the given attention units (``{layer: [unit]}``,
    heads or KV groups, see :func:`n_head_units`) and feed-forward neurons (``{layer: [neuron]}``).

    ``model`` itself is not changed. ValueError when a layer would be left with no heads or no neurons.
    """
    blocks = _dense_blocks(model)
    heads, neurons = heads or {}, neurons or {}
    _check_units("heads", heads, len(blocks), lambda i: n_head_units(blocks[i].attn))
    _check_units("neurons", neurons, len(blocks), lambda i: _ffn_matrices(blocks[i].ffn)[2])
    small = copy.deepcopy(model)
    small.__class__ = PrunedDecoderLM
    for i, block in enumerate(small.blocks):
        attn = block.attn
        if heads.get(i):
            kept = _complement(n_head_units(attn), heads[i]).tolist()
            # new layout: [q of kept units | k of kept units | v of kept units]
            parts = [_head_rows(attn, u) for u in kept]
            hd, group = attn.head_dim, attn.n_head // attn.n_kv_head
            q = [r for qkv_rows, _ in parts for r in qkv_rows[: group * hd]]
            k = [r for qkv_rows, _ in parts for r in qkv_rows[group * hd : (group + 1) * hd]]
            v = [r for qkv_rows, _ in parts for r in qkv_rows[(group + 1) * hd :]]
            rows, cols = q + k + v, [c for _, proj_cols in parts for c in proj_cols]
            attn.qkv = _slice_linear(attn.qkv, rows=rows)
            attn.proj = _slice_linear(attn.proj, cols=cols)
            attn.n_kv_head = len(kept)
            attn.n_head = len(kept) * group
        if neurons.get(i):
            ffn = block.ffn
            first, second, d_ff = _ffn_matrices(ffn)
            kept = _complement(d_ff, neurons[i])
            new_first = _slice_linear(first, rows=_neuron_rows(ffn, kept))
            new_second = _slice_linear(second, cols=kept)
            if isinstance(ffn, SwiGLU):
                ffn.gate_up, ffn.down, ffn.d_ff = new_first, new_second, len(kept)
            else:
                ffn.fc, ffn.proj = new_first, new_second
    return small


def pruned_like(model: DecoderLM, shapes: dict) -> PrunedDecoderLM:
    """A model of ``model``'s architecture cut to ``shapes`` (:meth:`PrunedDecoderLM.shape_summary`:
    ``{"heads": [per layer], "d_ff": [per layer]}``): the skeleton that a saved pruned model's tensors
    load into. Which units go does not matter, only how many; the weights are the loaded ones."""
    blocks = _dense_blocks(model)
    if len(shapes["heads"]) != len(blocks) or len(shapes["d_ff"]) != len(blocks):
        raise ValueError(f"shapes name {len(shapes['heads'])} layers; the model has {len(blocks)}")
    heads, neurons = {}, {}
    for i, block in enumerate(blocks):
        per_unit = block.attn.n_head // block.attn.n_kv_head  # query heads per removable unit
        drop_units = n_head_units(block.attn) - shapes["heads"][i] // per_unit
        drop_neurons = _ffn_matrices(block.ffn)[2] - shapes["d_ff"][i]
        if drop_units < 0 or drop_neurons < 0:
            raise ValueError(f"layer {i}: shapes {shapes} exceed the model's heads or feed-forward width")
        heads[i], neurons[i] = list(range(drop_units)), list(range(drop_neurons))
    return prune_model(model, heads, neurons)


@torch.no_grad()
def zero_units(
    model: DecoderLM,
    heads: dict[int, list[int]] | None = None,
    neurons: dict[int, list[int]] | None = None,
) -> DecoderLM:
    """A same-shaped copy of ``model`` with the given heads' output columns and neurons' output columns
    set to zero: the masked model that :func:`prune_model`'s smaller model must equal."""
    blocks = _dense_blocks(model)
    heads, neurons = heads or {}, neurons or {}
    _check_units("heads", heads, len(blocks), lambda i: n_head_units(blocks[i].attn))
    _check_units("neurons", neurons, len(blocks), lambda i: _ffn_matrices(blocks[i].ffn)[2])
    masked = copy.deepcopy(model)
    for i, block in enumerate(masked.blocks):
        for u in heads.get(i, []):
            block.attn.proj.weight[:, _head_rows(block.attn, u)[1]] = 0
        if neurons.get(i):
            _ffn_matrices(block.ffn)[1].weight[:, neurons[i]] = 0
    return masked
