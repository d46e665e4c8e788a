"""What the inspector shows, as plain data and images (no widgets): the samples of a run, the
layout grid of one sample, and the mask and attention heatmaps (PNG, drawn with matplotlib).

    load_samples   source (results JSONL / records / datasets.Dataset) -> ``SampleView``s, grouped and
                   indexed exactly as ``infer`` grouped them
    layout_grid    a final packed sequence -> ``LayoutGrid``: time columns across, groups down
    grid_html      the grid as an HTML table, coloured by group, generated tokens boxed
    mask_png       the [N, N] mask, each allowed cell coloured by its key's group
    leakage_png    the [G, G] attention mass with its values written in
"""

from __future__ import annotations

import dataclasses
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pmaccel.errors import PMAccelError
from pmaccel.settings import Settings

GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "mask")
# main, then the branches (tab10's light tints)
COLOURS = ["#d9d9d9", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5"]


def colour(label: str) -> str:
    """The colour of a group in every view: grey for ``"main"``, one tint per ``"branch k"``."""
    if label == "main":
        return COLOURS[0]
    k = int(label.rsplit(" ", 1)[1])
    return COLOURS[1 + (k - 1) % (len(COLOURS) - 1)]


# ----------------------------------------------------------------------------- samples


@dataclasses.dataclass
class SampleView:
    """One sample as the inspector shows it, with the outputs currently on display."""

    index: int  # the sample index of the run (seeds its sampling RNG)
    label: str  # "id 7" or "row 4"
    flat: bool
    main: str
    branches: list[Any]  # as generate() takes them
    records: list[dict[str, Any]]  # the source records it came from (one, or one per flat row)
    outputs: list[str] | None = None
    output_ids: list[list[int]] | None = None  # exact ids (after Run), else None
    finish_reasons: list[str | None] | None = None
    num_generated_tokens: list[int | None] | None = None
    generation: dict[str, Any] | None = None  # the settings that produced the outputs
    origin: str = "records"  # or "run"

    def as_input(self) -> dict[str, Any]:
        return {"main": self.main, "branches": self.branches}

    def search_text(self) -> str:
        parts = [self.main, *map(branch_text, self.branches), *(self.outputs or [])]
        return "\n".join(p for p in parts if p).lower()


def branch_text(branch: Any) -> str:
    if isinstance(branch, str):
        return branch
    return branch.get("text", "") if isinstance(branch, Mapping) else ""


def load_samples(source: Any, tokenizer: Any, settings: Settings) -> tuple[str, list[SampleView]]:
    """Read ``source`` and group its rows into samples exactly as ``infer`` does (same indices).

    Args:
        source: a results (or input) file path, a list of records, or a ``datasets.Dataset`` of rows.
        tokenizer: the model's tokenizer (flat rows are grouped by token budget).
        settings: the run's settings (grouping, seed, chat_template, ...).

    Returns:
        A name for the source and its samples, in sample order.
    """
    from pmaccel.grouping import Grouping, make_samples
    from pmaccel.rows import Table, check_row, read_rows

    if isinstance(source, str | Path):
        table, name = read_rows(source, on_error="raise"), str(source)
    else:
        if hasattr(source, "to_list") and hasattr(source, "column_names"):  # a datasets.Dataset
            source, name = source.to_list(), "dataset"
        elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
            name = "records"
        else:
            raise PMAccelError(f"source must be a JSONL path, a list of records or a datasets.Dataset, "
                               f"got {type(source).__name__}", field="source")
        rows = []
        for number, record in enumerate(source, start=1):
            try:
                rows.append(check_row(record, number))
            except PMAccelError as e:
                raise PMAccelError(e.problem, file=name, row=number, field=e.field) from None
        table = Table(path=name, rows=rows)
    if not table.rows:
        raise PMAccelError("no rows to inspect", file=name)
    grouping = dataclasses.replace(Grouping.from_settings(settings), max_samples=None, on_error="raise")
    samples, _ = make_samples(table, tokenizer, grouping)
    return name, [_sample_view(s, [table.rows[p].fields for p in s.rows], settings) for s in samples]


def _sample_view(sample: Any, records: list[dict[str, Any]], settings: Settings) -> SampleView:
    ids = [r["id"] for r in records if "id" in r]
    label = f"id {', '.join(map(str, ids))}" if ids else f"row {sample.rows[0] + 1}"
    view = SampleView(index=sample.index, label=label, flat=sample.flat, main=sample.main,
                      branches=list(sample.branches), records=records)
    if sample.flat:
        outs = [r.get("output") for r in records]
        if all(isinstance(o, str) for o in outs):
            view.outputs = outs
            view.finish_reasons = [r.get("finish_reason") for r in records]
            view.num_generated_tokens = [r.get("num_generated_tokens") for r in records]
            ids_ = [r.get("output_ids") for r in records]
            view.output_ids = ids_ if all(isinstance(x, list) for x in ids_) else None
    else:
        (r,) = records
        outs = r.get("outputs")
        if isinstance(outs, list) and len(outs) == len(sample.branches):
            view.outputs = [str(o) for o in outs]
            view.finish_reasons = list(r.get("finish_reasons") or [None] * len(outs))
            view.num_generated_tokens = list(r.get("num_generated_tokens") or [None] * len(outs))
            view.output_ids = r.get("output_ids") if isinstance(r.get("output_ids"), list) else None
    if view.outputs is not None:
        view.generation = {k: getattr(settings, k) for k in GENERATION_KEYS}
    return view


# ----------------------------------------------------------------------------- the layout grid


@dataclasses.dataclass
class LayoutGrid:
    """The packed sample as a table: one row per group (main, branches), one column per time."""

    labels: list[str]
    times: list[int]
    cells: list[list[str]]  # [group][column]: token text, "" where the group has no token
    generated: list[list[bool]]  # [group][column]: a generated (not prompt) token


def layout_grid(packed: Any, num_prompt: int, tokenizer: Any, labels: list[str]) -> LayoutGrid:
    """The grid of a final packed sequence whose first ``num_prompt`` tokens are the prompt."""
    from pmaccel.measure import token_groups

    groups, _ = token_groups(packed)
    t0, t1 = int(packed.time.min()), int(packed.time.max())
    times = list(range(t0, t1 + 1))
    cells = [[""] * len(times) for _ in labels]
    generated = [[False] * len(times) for _ in labels]
    for i, (tok, g, t) in enumerate(zip(packed.input_ids.tolist(), groups.tolist(), packed.time.tolist())):
        cells[g][t - t0] = tokenizer.decode([tok])
        generated[g][t - t0] = i >= num_prompt
    return LayoutGrid(labels, times, cells, generated)


def grid_html(grid: LayoutGrid) -> str:
    """The grid as an HTML table (cells coloured by group, generated tokens bold and boxed)."""

    def cell_text(text: str) -> str:
        return html.escape(text.replace("\n", "↵").replace(" ", "·")) or "&nbsp;"

    head = "".join(f"<th style='padding:1px 3px;color:#666;font-weight:normal'>{t}</th>" for t in grid.times)
    rows = []
    for g, label in enumerate(grid.labels):
        tds = []
        for text, gen in zip(grid.cells[g], grid.generated[g]):
            if not text:
                tds.append("<td></td>")
                continue
            style = f"background:{colour(label)};padding:1px 3px;white-space:pre;border:1px solid #fff"
            if gen:
                style += ";font-weight:bold;border:1px solid #333"
            tds.append(f"<td style='{style}'>{cell_text(text)}</td>")
        rows.append(f"<tr><th style='text-align:left;padding:1px 6px;white-space:nowrap;background:{colour(label)}'>"
                    f"{html.escape(label)}</th>{''.join(tds)}</tr>")
    return ("<div class='pm-grid' style='overflow-x:auto;max-width:100%'><table style='border-collapse:collapse;"
            "font-family:monospace;font-size:12px'>"
            f"<tr><th style='text-align:left;padding:1px 6px;color:#666'>time</th>{head}</tr>{''.join(rows)}"
            "</table></div><div style='font-size:11px;color:#666'>prompt tokens plain, generated tokens bold "
            "and boxed; · is a space, ↵ a newline</div>")


# ----------------------------------------------------------------------------- heatmaps


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def mask_png(allowed: np.ndarray, groups: np.ndarray, labels: list[str], mask: str) -> bytes:
    """The mask as an image: cell (i, j) coloured by key j's group when i may attend to j, white otherwise."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rgb = np.ones((*allowed.shape, 3))
    palette = np.array([to_rgb(colour(label)) for label in labels]) * 0.85
    rgb[allowed] = palette[np.broadcast_to(groups[None, :], allowed.shape)[allowed]]
    fig = Figure(figsize=(4.6, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(f"{mask} mask ({allowed.shape[0]} tokens, packed order)", fontsize=10)
    ax.set_xlabel("key token", fontsize=9)
    ax.set_ylabel("query token", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(handles=[Patch(color=palette[g], label=lab) for g, lab in enumerate(labels)], fontsize=7,
              loc="upper right", framealpha=0.9)
    fig.tight_layout()
    return _png(fig)


def leakage_png(matrix: np.ndarray | None, labels: list[str], title: str) -> bytes:
    """The branch x branch attention mass with its values written in; a note when there is none."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.9), dpi=100)
    ax = fig.add_subplot()
    if matrix is None:
        ax.axis("off")
        ax.text(0.5, 0.5, "attach a model to measure\nwhere attention goes", ha="center", va="center", fontsize=11)
        return _png(fig)
    ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    for (g, h), v in np.ndenumerate(matrix):
        ax.text(h, g, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("attended group (keys)", fontsize=9)
    ax.set_ylabel("attending group (queries)", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
