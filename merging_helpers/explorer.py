"""Introduced in chapter 1: look at one slice of a task vector.

``select_delta`` picks the delta tensors of one expert that lie in one transformer
block (or outside the blocks) and have one role (``attention``, ``ffn``, ``norm``,
``embedding``, ``head``), using :func:`merging_helpers.partitions.describe`.
``delta_histogram`` draws the histogram of those entries with plain matplotlib, and
``explore`` wraps it in an ipywidgets explorer. The widget needs a live kernel
(Jupyter, Colab); a static page shows what ``delta_histogram`` drew when the book
was built.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch

from .optional import require
from .partitions import describe

ALL = "all"
OUTSIDE = "outside"  # the layer value of parameters outside the transformer blocks


def _layer_of(name: str):
    layer = describe(name).layer
    return OUTSIDE if layer is None else layer


def layer_choices(delta: Mapping[str, torch.Tensor]) -> list:
    """Valid ``layer`` values for ``delta``: ``"all"``, the block indices in order, and
    ``"outside"`` when some parameters (embeddings, pooler...) sit outside the blocks (chapter 1)."""
    layers = {_layer_of(name) for name in delta}
    blocks = sorted(layer for layer in layers if layer != OUTSIDE)
    return [ALL, *blocks, *([OUTSIDE] if OUTSIDE in layers else [])]


def role_choices(delta: Mapping[str, torch.Tensor]) -> list[str]:
    """Valid ``role`` values for ``delta``: ``"all"`` and the roles present, sorted (chapter 1)."""
    return [ALL, *sorted({describe(name).role for name in delta})]


def _normalize_layer(layer, valid: list):
    if isinstance(layer, str):
        if layer in (ALL, OUTSIDE):
            return layer
        if layer.removeprefix("layer.").isdigit():
            layer = int(layer.removeprefix("layer."))
        else:
            raise ValueError(f"layer {layer!r} is not valid; choose one of {valid}")
    elif not isinstance(layer, bool):
        try:
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"layer {layer!r} is not valid; choose one of {valid}") from None
    else:
        raise ValueError(f"layer {layer!r} is not valid; choose one of {valid}")
    if layer not in valid:
        raise ValueError(f"layer {layer!r} is not valid; choose one of {valid}")
    return layer


def select_delta(deltas: Mapping[str, Mapping[str, torch.Tensor]], expert: str, layer=ALL,
                 role: str = ALL) -> dict[str, torch.Tensor]:
    """The tensors of ``deltas[expert]`` in block ``layer`` with role ``role`` (chapter 1).

    ``layer``: ``"all"``, a block index (``3`` or ``"layer.3"``) or ``"outside"``;
    ``role``: ``"all"`` or a role of :mod:`merging_helpers.partitions`. A name that is
    not valid raises a ValueError listing the valid ones, and so does a valid pair that
    selects nothing (e.g. the embedding role inside a block).
    """
    if expert not in deltas:
        raise ValueError(f"expert {expert!r} is not valid; choose one of {list(deltas)}")
    delta = deltas[expert]
    layers, roles = layer_choices(delta), role_choices(delta)
    layer = _normalize_layer(layer, layers)
    if role not in roles:
        raise ValueError(f"role {role!r} is not valid; choose one of {roles}")
    chosen = {name: t for name, t in delta.items()
              if (layer == ALL or _layer_of(name) == layer) and (role == ALL or describe(name).role == role)}
    if not chosen:
        here = sorted({describe(name).role for name in delta if layer == ALL or _layer_of(name) == layer})
        raise ValueError(f"no parameter of expert {expert!r} is in layer {layer!r} with role {role!r}; "
                         f"the roles in layer {layer!r} are {here}")
    return chosen


def layer_role_frame(values: Mapping[str, float], columns=None):
    """A ``{layer_role key: value}`` dict (as returned by ``rms_by_partition(delta,
    "layer_role")``) as a table: one row per block (``"layer 0"``, ``"layer 1"``... in
    numeric order), then ``"outside blocks"`` for the keys without a layer (embedding,
    norm, head), one column per role. Missing cells are NaN; ``columns`` fixes the role
    order (roles not listed are dropped) (chapter 1)."""
    import pandas as pd

    cells = {}
    for key, value in values.items():
        if key.startswith("layer."):
            _, layer, role = key.split(".", 2)
            if not layer.isdigit():
                raise ValueError(f"layer_role_frame: {key!r} is not a layer_role key")
            cells[(int(layer), role)] = value
        else:
            cells[(OUTSIDE, key)] = value
    layers = sorted({layer for layer, _ in cells if layer != OUTSIDE})
    roles = list(columns) if columns is not None else sorted({role for _, role in cells})
    index = [f"layer {layer}" for layer in layers] + (["outside blocks"] if any(l == OUTSIDE for l, _ in cells) else [])
    frame = pd.DataFrame(float("nan"), index=index, columns=roles)
    for (layer, role), value in cells.items():
        if role in frame.columns:
            frame.loc["outside blocks" if layer == OUTSIDE else f"layer {layer}", role] = value
    return frame


def delta_histogram(deltas: Mapping[str, Mapping[str, torch.Tensor]], expert: str, layer=ALL, role: str = ALL,
                    bins: int = 101, ax=None, log_counts: bool = True):
    """Draw the histogram of the signed Δ entries chosen by :func:`select_delta` (chapter 1).

    The bins are symmetric around 0 and span the largest |Δ| of the selection; the count
    axis is logarithmic by default (most entries are tiny). Dashed lines mark ±RMS.
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    chosen = select_delta(deltas, expert, layer, role)  # validates every name
    layer = _normalize_layer(layer, layer_choices(deltas[expert]))
    values = torch.cat([t.detach().reshape(-1).float().cpu() for t in chosen.values()])
    limit = float(values.abs().max())
    limit = limit if limit > 0 else 1e-12
    counts = torch.histc(values, bins=bins, min=-limit, max=limit)
    edges = torch.linspace(-limit, limit, bins + 1)
    rms = math.sqrt(float(values.double().pow(2).mean()))
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.7)
    for x in (-rms, rms):
        ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
    if log_counts:
        ax.set_yscale("log")
    where = {ALL: "all layers", OUTSIDE: "outside the blocks"}.get(layer, f"layer {layer}")
    ax.set(xlabel="Δ (fine-tuned − base)", ylabel="entries" + (" (log scale)" if log_counts else ""),
           title=f"{expert}, {where}, role {role}: {values.numel():,} entries in {len(chosen)} tensors, "
                 f"RMS {rms:.2e}")
    ax.title.set_fontsize(9)
    return ax


def explore(deltas: Mapping[str, Mapping[str, torch.Tensor]], bins: int = 101):
    """An ipywidgets explorer: three drop-downs (expert, layer, role) and the histogram
    of :func:`delta_histogram`. Needs ``ipywidgets`` and a live kernel to react (chapter 1)."""
    widgets = require("ipywidgets", "the delta explorer")
    import matplotlib.pyplot as plt
    from IPython.display import display

    first = next(iter(deltas.values()))
    expert = widgets.Dropdown(options=list(deltas), description="expert")
    layer = widgets.Dropdown(options=[("outside blocks" if v == OUTSIDE else str(v), v) for v in layer_choices(first)], description="layer")
    role = widgets.Dropdown(options=role_choices(first), description="role")
    out = widgets.Output()

    def draw(_change=None):
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(7, 3.5))
            try:
                delta_histogram(deltas, expert.value, layer.value, role.value, bins=bins, ax=ax)
            except ValueError as err:  # e.g. role "embedding" inside a block
                ax.set_axis_off()
                ax.text(0.5, 0.5, str(err), ha="center", va="center", wrap=True, fontsize=9)
            display(fig)
            plt.close(fig)

    for box in (expert, layer, role):
        box.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([expert, layer, role]), out])
