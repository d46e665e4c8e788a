"""Every setting of a run, written once: ``Settings`` is the source of the CLI flags, of
``infer(**kwargs)`` and of the flag table in the docs (SPEC §8).

Each field has a type, a default and ``metadata={"help": ...}`` (plus ``"choices"`` where the
values are a closed set). ``build_parser`` turns the fields into argparse flags: booleans become
``--x [BOOL]`` / ``--no_x`` pairs, ``X | None`` fields take an ``X``. Parsed flags are passed on only
when given, so a default lives only here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pmaccel.errors import PMAccelError

DEFAULT_OUT_PATH = "pmaccel_outputs.jsonl"
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, result: bool = True) -> Any:
    """A field with its help text; ``result=False`` marks a setting that never changes a sample's result
    (so results computed under another value may be resumed)."""
    return field(default=default, metadata={"help": help, "choices": choices, "result": result})


@dataclass
class Settings:
    """The settings of one ``pmaccel.infer`` run; every field is also a CLI flag ``--<name>``.

    Example:
        >>> s = Settings(data_path="rows.jsonl", out_path="out.jsonl", max_new_tokens=32)
        >>> s.max_new_tokens
        32
    """

    # model
    base_model: str | None = _opt(
        None, "model directory, GGUF file or model id; default: the embedded SmolLM2-135M-Instruct")
    lora_path: str | None = _opt(None, "ParallelMind LoRA file (.pth/.safetensors) or PEFT adapter directory")
    lora_rank: int | None = _opt(None, "LoRA rank; read from the file when omitted (must agree if given)")
    rope_2d_ratio: float = _opt(
        0.5, "fraction of rotary frequency pairs that carry (branch, time) in 2D RoPE")
    patch_rope: bool | None = _opt(None, "use 2D RoPE; default: on when a LoRA is given")
    dtype: str = _opt("auto", "model dtype; auto = bfloat16 on CUDA, float32 on CPU", choices=DTYPE_NAMES)
    device: str = _opt(
        "auto", "device (cpu, cuda, cuda:1, ...); auto = the device Accelerate gives this process",
        result=False)
    num_processes: int = _opt(
        1, "processes to start on this machine, one per GPU (as accelerate launch --multi_gpu --num_processes "
           "N -m pmaccel, without the accelerate command's start-up); under a launcher its own count applies",
        result=False)
    # data
    data_path: str | None = _opt(
        None, "input rows: .jsonl/.json/.parquet/.csv/.arrow file or a save_to_disk dataset directory; "
              "default: the shipped example file", result=False)
    out_path: str = _opt(
        DEFAULT_OUT_PATH, "output JSONL, one line per input row, in input order", result=False)
    max_samples: int | None = _opt(None, "process only the first N samples; 0 or omitted = all", result=False)
    branches_per_sample: int = _opt(1, "flat rows: branches grouped into one sample", result=False)
    max_branches_per_sample: int = _opt(
        0, "flat rows: if > 0, each sample gets a seeded random count in [min, max] branches", result=False)
    min_branches_per_sample: int = _opt(1, "flat rows: the lower bound of that random count", result=False)
    max_total_tokens: int = _opt(
        0, "flat rows: prompt-token budget of one sample (0 = none); a longer single branch is an error",
        result=False)
    num_workers: int = _opt(
        0, "worker processes that read and tokenize the rows, any format (0 or 1 = none); the row and token "
           "tables are cached in the datasets cache (HF_DATASETS_CACHE), about twice the input's size", result=False)
    # batching
    batch_size: int = _opt(
        0, "the most samples decoded at once, or branches per step with --no_batch_by_samples; 0 = as many as "
           "the device memory holds (pmaccel score: 16 per forward)", result=False)
    batch_by_samples: bool = _opt(
        True, "batch_size counts samples; off: it caps the branches per step", result=False)
    # layout and mask
    branch_stride: int = _opt(128, "2D RoPE branch position = branch_id * branch_stride")
    align: str = _opt(
        "left", "branch times start together (left) or end together (right)", choices=("left", "right"))
    interleave_branches: bool = _opt(True, "pack tokens by (time, branch); off: by (branch, time)")
    random_time_offset: bool = _opt(False, "shift each branch's times by a seeded random amount")
    mask: str | None = _opt(
        None, "attention mask; default: columnar with 2D RoPE, isolated without",
        choices=("columnar", "isolated"))
    chat_template: bool = _opt(False, "wrap main + branch in the tokenizer's chat template")
    # decoding
    max_new_tokens: int = _opt(128, "the most tokens generated per branch")
    temperature: float = _opt(0.0, "sampling temperature; 0 = greedy")
    top_p: float = _opt(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = _opt(0, "keep the k most likely tokens when sampling (0 = off)")
    repetition_penalty: float = _opt(1.0, "repetition penalty (1 = off)")
    seed: int = _opt(0, "seed of the flat-row grouping and of every sample's sampling RNG")
    deterministic: bool | None = _opt(
        None, "batch-invariant kernels on CUDA: every sample's tokens and scores are the same at any batch size, "
              "with any companions and at any process count; default: on where Triton is available (CUDA builds "
              "of torch); CPU runs in fp32 decode the same tokens at any batch size as they are (scores: to about "
              "1e-7, not to the bit)")
    # evaluation
    compare: bool = _opt(
        False, "also decode every sample as independent branches (isolated mask, 2D RoPE off) and report per "
               "branch whether the outputs agree and the first token where they diverge")
    leakage: bool = _opt(
        False, "measure per layer the mean attention mass branch tokens put on other branches (one more "
               "forward per sample, with attention probabilities)")
    length_normalize: bool = _opt(
        False, "pmaccel score: pick the multiple-choice answer by mean log-prob per token, not the sum",
        result=False)
    # run
    resume: bool | None = _opt(
        None,
        "reuse the finished samples in the part files of an interrupted run; default: on when they exist",
        result=False)
    on_error: str = _opt(
        "raise", "bad input rows: stop (raise), or skip them into <out_path>.errors.jsonl",
        choices=("raise", "skip"), result=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), _field_types()[f.name]))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise PMAccelError(f"must be one of {', '.join(choices)}, got {value!r}", field=f.name)
        _check_ranges(self)


def default(name: str) -> Any:
    """The default of setting ``name``, the one place it is written (function signatures use this).

    Example:
        >>> default("max_new_tokens")
        128
    """
    return _defaults()[name]


@functools.cache
def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(Settings)}


def _check_ranges(s: Settings) -> None:
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise PMAccelError(f"must be {what}, got {getattr(s, name)!r}", field=name)

    need(s.lora_rank is None or s.lora_rank >= 1, "lora_rank", "at least 1")
    need(0.0 < s.rope_2d_ratio <= 1.0, "rope_2d_ratio", "in (0, 1]")
    need(s.max_samples is None or s.max_samples >= 0, "max_samples", "0 (all) or more")
    need(s.branches_per_sample >= 1, "branches_per_sample", "at least 1")
    need(s.min_branches_per_sample >= 1, "min_branches_per_sample", "at least 1")
    need(s.max_branches_per_sample == 0 or s.max_branches_per_sample >= s.min_branches_per_sample,
         "max_branches_per_sample", f"0 (off) or at least min_branches_per_sample="
         f"{s.min_branches_per_sample}")
    need(s.max_total_tokens >= 0, "max_total_tokens", "0 (none) or more")
    need(s.num_workers >= 0, "num_workers", "0 or more")
    need(s.num_processes >= 1, "num_processes", "at least 1")
    need(s.batch_size >= 0, "batch_size", "0 (automatic) or more")
    need(s.branch_stride >= 1, "branch_stride", "at least 1")
    need(s.max_new_tokens >= 1, "max_new_tokens", "at least 1")
    need(s.temperature >= 0.0, "temperature", "0 (greedy) or more")
    need(0.0 < s.top_p <= 1.0, "top_p", "in (0, 1]")
    need(s.top_k >= 0, "top_k", "0 (off) or more")
    need(s.repetition_penalty > 0.0, "repetition_penalty", "more than 0")
    need(bool(s.out_path), "out_path", "a file path")


# ----------------------------------------------------------------------------- types


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _base_type(tp: Any) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _check_type(name: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise PMAccelError("must not be None", field=name)
    if base is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(value, bool) and base is not bool) or not isinstance(value, base):
        raise PMAccelError(f"must be {base.__name__}, got {type(value).__name__} {value!r}", field=name)
    return value


def settings_from_kwargs(kwargs: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """``Settings`` from keyword arguments (over ``base`` if given); an unknown name is an error.

    Args:
        kwargs: setting names and values, as ``infer(**kwargs)`` receives them.
        base: settings to start from; default: the defaults.

    Raises:
        PMAccelError: an unknown setting, or a bad value.
    """
    names = [f.name for f in dataclasses.fields(Settings)]
    for key in kwargs:
        if key not in names:
            raise PMAccelError(f"unknown setting; known settings: {', '.join(names)}", field=key)
    if base is None:
        return Settings(**kwargs)
    return dataclasses.replace(base, **kwargs)


# ----------------------------------------------------------------------------- CLI


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _default_text(value: Any) -> str:
    return "none" if value is None else str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DESCRIPTION = ("Parallel (multi-branch) inference for Hugging Face causal LMs. Runs alone, or under "
               "`accelerate launch -m pmaccel ...` on several GPUs or nodes. `pmaccel score [flags]` scores "
               "given continuations instead (log-likelihood, perplexity, multiple choice).")


def build_parser(prog: str = "pmaccel", description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """An argparse parser with one flag per ``Settings`` field (bools: ``--x [BOOL]`` and ``--no_x``).

    Flags that are not given are absent from the parsed namespace, so defaults come from
    ``Settings`` alone.
    """
    parser = _Parser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    types = _field_types()
    for f in dataclasses.fields(Settings):
        base, _ = _base_type(types[f.name])
        help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if base is bool:
            parser.add_argument(f"--{f.name}", dest=f.name, nargs="?", const=True, type=_parse_bool,
                                metavar="BOOL", help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False,
                                help=f"same as --{f.name} false")
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(f"--{f.name}", dest=f.name, type=base, choices=choices,
                                metavar=None if choices else f.name.upper(), help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None, prog: str = "pmaccel",
                   description: str = DESCRIPTION) -> Settings:
    """Parse command-line flags into ``Settings`` (argparse exits with status 2 on an unknown flag).

    Example:
        >>> parse_settings(["--data_path", "rows.jsonl", "--no_batch_by_samples"]).batch_by_samples
        False
    """
    namespace = build_parser(prog, description).parse_args(argv)
    return settings_from_kwargs(vars(namespace))


def settings_markdown() -> str:
    """The flag table (Markdown) for the docs, generated from ``Settings``."""
    types = _field_types()
    lines = ["| flag | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        base, optional = _base_type(types[f.name])
        flag = f"`--{f.name}` / `--no_{f.name}`" if base is bool else f"`--{f.name}`"
        kind = " \\| ".join(f.metadata["choices"]) if f.metadata.get("choices") else base.__name__
        lines.append(f"| {flag} | {kind}{' or none' if optional else ''} | `{_default_text(f.default)}` "
                     f"| {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
