"""``pmaccel.inspect``: open one sample of a run and see it — an ipywidgets app for Jupyter and Voilà.

    source (results JSONL / records / datasets.Dataset)  ->  samples (grouped as ``infer`` grouped them)
    picker, search        which sample
    branches              prompt, output, finish reason, token counts per branch
    layout grid           time columns across, main and branches down, token text in the cells
    mask heatmap          which token may attend to which (columnar / isolated), SPEC §3
    attention heatmap     branch x branch attention mass of one layer or all (``pmaccel.measure``)
    Run / Save            re-decode this sample with ``pmaccel.generate`` (streamed step by step),
                          append it with its new outputs to a JSONL file

Every child widget is an attribute, and every view has an accessor that returns what it shows
(``grid_cells()``, ``mask_matrix``, ``leakage_matrix``, ``branch_outputs()``), so tests drive the
app exactly as a user does: set ``picker.value``, ``mask.value``, ``temperature.value``, call
``run_button.click()``. Without a model the app is read-only.

The data behind the views (samples, grid, heatmap images) is built in ``pmaccel.views``;
ipywidgets and matplotlib are imported when the app is built (``pip install "pmaccel[notebook]"``).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pmaccel.errors import PMAccelError
from pmaccel.output import dumps
from pmaccel.settings import Settings, settings_from_kwargs
from pmaccel.views import (
    LayoutGrid,
    SampleView,
    branch_text,
    colour,
    grid_html,
    layout_grid,
    leakage_png,
    load_samples,
    mask_png,
)

INSTALL_HINT = 'pip install "pmaccel[notebook]"'
ATTACH_HINT = ("Read-only: no model is attached, so Run and the attention view are off. Attach one with "
               "<code>model, tokenizer = pmaccel.load_model()</code> then <code>app.attach(model, tokenizer)</code> "
               "(or <code>pmaccel.inspect(source, model, tokenizer)</code>).")
RETOKENIZED_HINT = ("The records carry output text only: the generated tokens in the grid are that text "
                    "re-tokenized, so they may differ slightly from the ids the model emitted. Click Run for exact ids.")
OUTPUT_FIELDS = ("outputs", "finish_reasons", "num_generated_tokens", "output", "finish_reason")


def _require_extras() -> None:
    try:
        import ipywidgets  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PMAccelError(f"the inspector needs ipywidgets and matplotlib ({e.name} is missing); "
                           f"install them with: {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------- the app


class InspectorApp:
    """The inspection app: state, child widgets and what each view shows.

    Build it with ``pmaccel.inspect``; display it by leaving it as a cell's last expression (or
    ``display(app.widget)``).

    Attributes:
        picker: ``IntSlider`` over the sample indices; ``search``: ``Text`` (an id or words).
        mask: ``ToggleButtons`` columnar / isolated (the views and Run); ``layer``: ``Dropdown``.
        max_new_tokens, temperature, top_p, seed: Run's settings; ``save_path``: where Save appends.
        run_button, save_button: ``Button``; ``status``: ``HTML``; ``widget``: the whole app.
        samples: every ``SampleView``; ``stream``: ``(step, texts)`` of the last Run, step by step.
    """

    def __init__(self, samples: list[SampleView], source_name: str, tokenizer: Any, settings: Settings, *,
                 model: Any = None, save_path: str | Path | None = None, tokenizer_note: str = ""):
        import ipywidgets as w

        self.samples, self.source_name, self.settings = samples, source_name, settings
        self.model, self.tokenizer, self.tokenizer_note = model, tokenizer, tokenizer_note
        self.stream: list[tuple[int, list[str]]] = []
        self.last_saved: dict[str, Any] | None = None
        self._attention_cache: dict[tuple[int, str, int], Any] = {}
        self.retokenized = False  # the grid shows output text re-tokenized, not the emitted ids
        self._packed: Any = None  # the sample's final PackedSample
        self._num_prompt = self._main_length = 0
        self._prompt_lengths: list[int] = []
        self._grid: LayoutGrid | None = None

        full = w.Layout(width="100%")
        initial = {"description_width": "initial"}
        self.title = w.HTML()
        self.picker = w.IntSlider(value=0, min=0, max=max(len(samples) - 1, 0), description="sample",
                                  continuous_update=False, layout=w.Layout(width="420px"))
        self.search = w.Text(placeholder="id or words, then Enter", description="find", continuous_update=False,
                             layout=w.Layout(width="320px"))
        self.search_status = w.HTML()
        self.notice = w.HTML()
        self.header = w.HTML(layout=full)
        self.branches_box = w.HBox(layout=w.Layout(flex_flow="row wrap", width="100%"))
        self.output_widgets: list[Any] = []
        self.grid_html = w.HTML(layout=full)
        self.mask = w.ToggleButtons(options=["columnar", "isolated"], value=self._default_mask(),
                                    description="mask", style={"button_width": "90px", **initial})
        self.mask_image = w.Image(format="png", layout=w.Layout(width="460px"))
        self.layer = w.Dropdown(options=[("all layers (mean)", "all")], value="all", description="layer",
                                layout=w.Layout(width="240px"))
        self.leakage_image = w.Image(format="png", layout=w.Layout(width="460px"))
        self.max_new_tokens = w.BoundedIntText(value=settings.max_new_tokens, min=1, max=4096,
                                               description="max_new_tokens", style=initial,
                                               layout=w.Layout(width="190px"))
        self.temperature = w.BoundedFloatText(value=settings.temperature, min=0.0, max=10.0, step=0.1,
                                              description="temperature", style=initial,
                                              layout=w.Layout(width="170px"))
        self.top_p = w.BoundedFloatText(value=settings.top_p, min=0.01, max=1.0, step=0.05, description="top_p",
                                        style=initial, layout=w.Layout(width="130px"))
        self.seed = w.IntText(value=settings.seed, description="seed", style=initial,
                              layout=w.Layout(width="140px"))
        self.run_button = w.Button(description="Run", button_style="primary", icon="play",
                                   tooltip="re-run this sample with these settings, streaming the branches")
        self.save_button = w.Button(description="Save", icon="save",
                                    tooltip="append this sample and its outputs to the JSONL file")
        self.save_path = w.Text(value=str(save_path or _default_save_path(source_name)), description="save to",
                                layout=w.Layout(width="420px"))
        self.status = w.HTML()

        self.picker.observe(lambda _: self.show(), names="value")
        self.search.observe(lambda change: self.find(change["new"]), names="value")
        self.mask.observe(lambda _: self._render_views(), names="value")
        self.layer.observe(lambda _: self._render_leakage(), names="value")
        self.run_button.on_click(lambda _: self.run())
        self.save_button.on_click(lambda _: self.save())

        controls = w.VBox([
            w.HBox([self.max_new_tokens, self.temperature, self.top_p, self.seed, self.run_button]),
            w.HBox([self.save_path, self.save_button]),
            self.status,
        ])
        section = lambda text: w.HTML(f"<h4 style='margin:8px 0 2px 0'>{text}</h4>")  # noqa: E731
        self.widget = w.VBox([
            self.title,
            w.HBox([self.picker, self.search, self.search_status]),
            self.notice,
            self.header,
            section("Branches"),
            self.branches_box,
            section("Layout: time columns across, main and branches down"),
            self.grid_html,
            section("Attention: what each token may see, and where it looks"),
            self.mask,
            w.HBox([self.mask_image, w.VBox([self.layer, self.leakage_image])],
                   layout=w.Layout(flex_flow="row wrap")),
            section("Re-run this sample"),
            controls,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("pmaccel-inspector")
        self._set_model_state()
        self.show()

    # ------------------------------------------------------------------ what the views show

    @property
    def sample(self) -> SampleView:
        """The sample on display."""
        return self.samples[self.picker.value]

    @property
    def packed(self) -> Any:
        """The sample's final packed sequence (prompt + generated tokens), a ``PackedSample``."""
        return self._packed

    @property
    def group_labels(self) -> list[str]:
        """``"main"``, ``"branch 1"``, ...: the rows of the grid and of the attention heatmap."""
        return self._grid.labels if self._grid is not None else []

    @property
    def mask_matrix(self) -> np.ndarray:
        """The mask on display, [N, N] bool in packed order (query rows, key columns)."""
        from pmaccel.measure import sample_mask

        return sample_mask(self._packed, self.mask.value).numpy()

    @property
    def leakage_matrix(self) -> np.ndarray | None:
        """The attention heatmap on display, [G, G] (rows sum to 1), or None without a model."""
        ga = self._group_attention()
        if ga is None:
            return None
        return ga.matrix(None if self.layer.value == "all" else self.layer.value).numpy()

    def grid_cells(self) -> list[list[str]]:
        """The token text of every grid cell, [group][time column] ("" where empty)."""
        return [list(row) for row in self._grid.cells] if self._grid is not None else []

    def grid_times(self) -> list[int]:
        """The time of each grid column."""
        return list(self._grid.times) if self._grid is not None else []

    def branch_outputs(self) -> list[str]:
        """The output text on display for each branch ("" when there is none yet)."""
        return list(self.sample.outputs or [""] * len(self.sample.branches))

    # ------------------------------------------------------------------ actions

    def attach(self, model: Any, tokenizer: Any | None = None) -> None:
        """Attach a model (and its tokenizer) to turn on Run and the attention view.

        Example:
            >>> model, tokenizer = pmaccel.load_model()  # doctest: +SKIP
            >>> app.attach(model, tokenizer)  # doctest: +SKIP
        """
        self.model = model
        if tokenizer is not None and tokenizer is not self.tokenizer:
            self.tokenizer, self.tokenizer_note = tokenizer, ""
            _, self.samples = load_samples(self.samples_as_records(), tokenizer, self.settings)
        self._attention_cache.clear()
        self._set_model_state()
        self.mask.value = self._default_mask()
        self.show()

    def samples_as_records(self) -> list[dict[str, Any]]:
        """The source records, in order (as ``load_samples`` takes them)."""
        return [r for s in self.samples for r in s.records]

    def find(self, query: str) -> int | None:
        """Show the first sample whose id is ``query``, or whose text contains it (case-insensitive)."""
        query = query.strip()
        if not query:
            self.search_status.value = ""
            return None
        hit = next((s.index for s in self.samples if any(str(r.get("id")) == query for r in s.records)), None)
        if hit is None:
            hit = next((s.index for s in self.samples if query.lower() in s.search_text()), None)
        if hit is None:
            self.search_status.value = f"<span style='color:#b00'>no sample matches {html.escape(query)!r}</span>"
            return None
        self.search_status.value = f"found: sample {hit}"
        self.picker.value = hit
        return hit

    def show(self) -> None:
        """Render every view for the picked sample."""
        s = self.sample
        self.title.value = (f"<h3 style='margin:4px 0'>pmaccel inspector — {html.escape(Path(self.source_name).name)}: "
                            f"{len(self.samples)} samples</h3>")
        self._layout_sample()
        main = html.escape(s.main) if s.main else "<i>(none)</i>"
        gen = ", ".join(f"{k}={v}" for k, v in (s.generation or {}).items())
        self.header.value = (f"<b>sample {s.index}</b> ({html.escape(s.label)}, {'flat rows' if s.flat else 'parallel row'}"
                             f", outputs from {s.origin}{': ' + html.escape(gen) if gen else ''})<br>"
                             f"<b>main</b>: <span style='white-space:pre-wrap'>{main}</span>")
        self._build_branch_cards()
        self._render_views()

    def run(self) -> dict[str, Any] | None:
        """Re-decode the sample with the controls' settings, updating the branch outputs at every step.

        Returns:
            The ``pmaccel.generate`` result, or None without a model.
        """
        from pmaccel.decode import generate

        if self.model is None:
            self.status.value = ATTACH_HINT
            return None
        s, gen = self.sample, self._controls()
        self.stream = []
        self.run_button.disabled = True
        self.status.value = "running…"

        def on_step(step: int, partial: list[dict[str, Any]]) -> None:
            (p,) = partial
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in p["output_ids"]]
            self.stream.append((step, texts))
            for k, text in enumerate(texts):
                self.output_widgets[k].value = _output_html(text, p["finish_reasons"][k], len(p["output_ids"][k]))
            self.status.value = f"step {step}: {sum(map(len, p['output_ids']))} tokens"

        try:
            result = generate(self.model, self.tokenizer, [s.as_input()], indices=[s.index], on_step=on_step,
                              **self._decode_kwargs(gen))[0]
        except PMAccelError as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return None
        finally:
            self.run_button.disabled = False
        s.outputs, s.output_ids = result["outputs"], result["output_ids"]
        s.finish_reasons, s.num_generated_tokens = result["finish_reasons"], result["num_generated_tokens"]
        s.generation, s.origin = gen, "run"
        self.show()
        self.status.value = (f"done: {sum(result['num_generated_tokens'])} tokens in {len(self.stream)} steps "
                             f"({', '.join(f'{k}={v}' for k, v in gen.items())})")
        return result

    def save(self) -> dict[str, Any]:
        """Append the sample and the outputs on display to ``save_path`` (one JSON line, a parallel row).

        Returns:
            The line written.

        Raises:
            PMAccelError: the file cannot be written (the status line says so too).
        """
        s = self.sample
        line: dict[str, Any] = {"sample": s.index}
        if not s.flat:
            line.update({k: v for k, v in s.records[0].items() if k not in OUTPUT_FIELDS})
        elif any("id" in r for r in s.records):
            line["ids"] = [r.get("id") for r in s.records]
        line.update(main=s.main, branches=s.branches, outputs=self.branch_outputs(),
                    finish_reasons=s.finish_reasons, num_generated_tokens=s.num_generated_tokens,
                    generation=s.generation)
        path = Path(self.save_path.value).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(dumps(line) + "\n")
        except OSError as e:
            self.status.value = f"<span style='color:#b00'>cannot write {html.escape(str(path))}: {html.escape(str(e))}</span>"
            raise PMAccelError(f"cannot write {path}: {e.strerror or e}; choose another 'save to' path",
                               field="save_path") from None
        self.last_saved = line
        self.status.value = f"saved sample {s.index} to {html.escape(str(path))}"
        return line

    # ------------------------------------------------------------------ internals

    def _default_mask(self) -> str:
        from pmaccel.rope import is_rope_2d

        if self.settings.mask:
            return self.settings.mask
        if self.model is not None:
            rope_2d = is_rope_2d(self.model)
        else:
            rope_2d = self.settings.patch_rope if self.settings.patch_rope is not None else bool(self.settings.lora_path)
        return "columnar" if rope_2d else "isolated"

    def _set_model_state(self) -> None:
        has_model = self.model is not None
        for control in (self.run_button, self.max_new_tokens, self.temperature, self.top_p, self.seed, self.layer):
            control.disabled = not has_model
        if has_model:
            n = self.model.config.num_hidden_layers
            self.layer.options = [("all layers (mean)", "all")] + [(f"layer {i}", i) for i in range(n)]
        notes = [] if has_model else [ATTACH_HINT]
        if self.tokenizer_note:
            notes.append(self.tokenizer_note)
        self.notice.value = "".join(f"<div style='color:#8a6d3b;background:#fcf8e3;padding:4px 8px;margin:2px 0'>"
                                    f"{n}</div>" for n in notes)

    def _controls(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens.value, "temperature": self.temperature.value,
                "top_p": self.top_p.value, "seed": self.seed.value, "mask": self.mask.value}

    def _decode_kwargs(self, gen: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``pmaccel.generate`` for this sample: the run's settings, then the controls."""
        from pmaccel.request import generate_kwargs

        return {**generate_kwargs(self.settings), **gen}

    def _layout_sample(self) -> None:
        """Pack the sample as decoding did, append the outputs on display, and build the grid."""
        from pmaccel.layout import append_outputs
        from pmaccel.request import Layout, pack_request

        s = self.sample
        layout = Layout.of(self.settings)
        if s.generation and "seed" in s.generation:  # decoded here, with the controls' seed
            layout = dataclasses.replace(layout, seed=s.generation["seed"])
        ts, prompt = pack_request(s.as_input(), self.tokenizer, layout, s.index)
        out_ids = s.output_ids
        if out_ids is None:
            out_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] if o else []
                       for o in (s.outputs or [""] * len(ts.branches))]
        self._packed = append_outputs(prompt, [list(x) for x in out_ids])
        self._num_prompt = prompt.num_tokens
        self._prompt_lengths = [len(b) for b in ts.branches]
        self._main_length = len(ts.main)
        has_main = bool(ts.main)
        labels = (["main"] if has_main else []) + [f"branch {k + 1}" for k in range(len(ts.branches))]
        self._grid = layout_grid(self._packed, self._num_prompt, self.tokenizer, labels)
        self.retokenized = s.output_ids is None and s.outputs is not None
        note = f"<div style='font-size:11px;color:#8a6d3b'>{RETOKENIZED_HINT}</div>" if self.retokenized else ""
        self.grid_html.value = grid_html(self._grid) + note

    def _build_branch_cards(self) -> None:
        import ipywidgets as w

        s = self.sample
        outputs = self.branch_outputs()
        cards, self.output_widgets = [], []
        for k, branch in enumerate(s.branches):
            prompt = branch_text(branch) or self.tokenizer.decode(branch.get("input_ids", []))
            reason = s.finish_reasons[k] if s.finish_reasons else None
            n_gen = s.num_generated_tokens[k] if s.num_generated_tokens else None
            out = w.HTML(_output_html(outputs[k], reason, n_gen, pending=s.outputs is None))
            out.add_class("pm-output")
            head = w.HTML(f"<div style='background:{colour(f'branch {k + 1}')};padding:2px 6px'><b>branch {k + 1}</b> · "
                          f"prompt {self._prompt_lengths[k]} tokens (+ main {self._main_length})</div>"
                          f"<div style='white-space:pre-wrap;font-size:12px;max-height:90px;overflow:auto;"
                          f"color:#444'>{html.escape(prompt)}</div>")
            self.output_widgets.append(out)
            cards.append(w.VBox([head, out], layout=w.Layout(width="32%", min_width="260px", margin="2px",
                                                              border=f"1px solid {colour(f'branch {k + 1}')}")))
        self.branches_box.children = cards

    def _render_views(self) -> None:
        from pmaccel.measure import token_groups

        groups, _ = token_groups(self._packed)
        self.mask_image.value = mask_png(self.mask_matrix, groups.numpy(), self.group_labels, self.mask.value)
        self._render_leakage()

    def _render_leakage(self) -> None:
        matrix = self.leakage_matrix
        layer = "all layers (mean)" if self.layer.value == "all" else f"layer {self.layer.value}"
        self.leakage_image.value = leakage_png(matrix, self.group_labels,
                                               f"attention mass, {self.mask.value} mask, {layer}")

    def _group_attention(self) -> Any:
        from pmaccel.measure import group_attention

        if self.model is None:
            return None
        key = (self.picker.value, self.mask.value, id(self._packed))
        if key not in self._attention_cache:
            self._attention_cache = {k: v for k, v in self._attention_cache.items() if k[2] == id(self._packed)}
            self._attention_cache[key] = group_attention(self.model, self._packed, mask=self.mask.value)
        return self._attention_cache[key]

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def _output_html(text: str, reason: str | None, n_tokens: int | None, pending: bool = False) -> str:
    if pending:
        body = "<i style='color:#888'>no output yet: click Run</i>"
    else:
        body = html.escape(text) if text else "<i style='color:#888'>(empty)</i>"
    meta = f"finish: {reason or '…'} · generated {'?' if n_tokens is None else n_tokens} tokens"
    return (f"<div style='font-size:11px;color:#666;padding:0 6px'>{html.escape(meta)}</div>"
            f"<div class='pm-output-text' style='white-space:pre-wrap;padding:2px 6px'>{body}</div>")


def _default_save_path(source_name: str) -> str:
    path = Path(source_name)
    if path.suffix in (".jsonl", ".json") and path.parent.exists():
        return str(path.with_name(path.stem + ".inspected.jsonl"))
    return "pmaccel_inspected.jsonl"


def _default_tokenizer(settings: Settings) -> tuple[Any, str]:
    """The tokenizer of the run's model, for a read-only app given no tokenizer."""
    from transformers import AutoTokenizer

    if settings.base_model is None:
        from pmaccel.embedded import embedded_model_dir

        return AutoTokenizer.from_pretrained(embedded_model_dir()), "Tokens: the embedded SmolLM2-135M-Instruct tokenizer."
    path = Path(settings.base_model).expanduser()
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(settings.base_model)
    return tok, f"Tokens: the tokenizer of {html.escape(settings.base_model)}."


def inspect(
    source: Any,
    model: Any = None,
    tokenizer: Any = None,
    *,
    settings: Settings | Mapping[str, Any] | None = None,
    save_path: str | Path | None = None,
    **overrides: Any,
) -> InspectorApp:
    """Open the samples of a run one at a time: layout, masks, attention, outputs; re-run and save.

    Args:
        source: a results JSONL written by ``pmaccel.infer`` (or any input file it reads), a list
            of records (what ``infer`` returns), or a ``datasets.Dataset`` of input rows.
        model: a model from ``pmaccel.load_model``; without one the app is read-only.
        tokenizer: its tokenizer; default: the tokenizer of ``settings.base_model`` (the embedded
            SmolLM2 when none).
        settings: the run's ``pmaccel.Settings`` (or a dict of its fields): grouping of flat rows,
            chat_template, branch_stride, align, and the defaults of the Run controls.
        save_path: where Save appends; default ``<source>.inspected.jsonl`` next to a source file.
        **overrides: any ``Settings`` field, over ``settings``.

    Returns:
        The ``InspectorApp``; leave it as a cell's last expression to display it.

    Raises:
        PMAccelError: ipywidgets/matplotlib are missing, or the source cannot be read.

    Example:
        >>> model, tokenizer = pmaccel.load_model()  # doctest: +SKIP
        >>> app = pmaccel.inspect("out.jsonl", model, tokenizer, max_new_tokens=32)  # doctest: +SKIP
        >>> app.picker.value = 3; app.run_button.click()  # doctest: +SKIP
    """
    _require_extras()
    if isinstance(settings, Settings):
        st = settings_from_kwargs(overrides, base=settings)
    else:
        st = settings_from_kwargs({**dict(settings or {}), **overrides})
    if model is not None and tokenizer is None:
        raise PMAccelError("give the model's tokenizer too: pmaccel.inspect(source, model, tokenizer)",
                           field="tokenizer")
    note = ""
    if tokenizer is None:
        tokenizer, note = _default_tokenizer(st)
    name, samples = load_samples(source, tokenizer, st)
    return InspectorApp(samples, name, tokenizer, st, model=model, save_path=save_path, tokenizer_note=note)
