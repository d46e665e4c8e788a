"""Settings: one dataclass from which the CLI flags, ``infer(**kwargs)`` and the docs table derive."""

from __future__ import annotations

import dataclasses

import pytest

from pmaccel.errors import PMAccelError
from pmaccel.settings import Settings, build_parser, parse_settings, settings_from_kwargs, settings_markdown

SPEC_FLAGS = (  # SPEC §8, names a ParallelMind user already types
    "base_model lora_path lora_rank rope_2d_ratio patch_rope data_path out_path max_samples branches_per_sample "
    "max_branches_per_sample min_branches_per_sample batch_by_samples batch_size max_total_tokens branch_stride "
    "random_time_offset interleave_branches max_new_tokens temperature top_p device dtype num_workers"
).split()
EXTRA_FLAGS = "seed mask chat_template align top_k repetition_penalty resume on_error".split()


def field_names():
    return [f.name for f in dataclasses.fields(Settings)]


def test_every_spec_flag_is_a_field_with_help():
    assert set(SPEC_FLAGS + EXTRA_FLAGS) <= set(field_names())
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"].strip(), f.name


def test_defaults_come_only_from_the_dataclass():
    assert parse_settings([]) == Settings()
    s = Settings()
    assert (s.rope_2d_ratio, s.batch_size, s.branch_stride, s.max_new_tokens, s.temperature) == (0.5, 0, 128, 128, 0.0)
    assert (s.patch_rope, s.mask, s.resume, s.base_model, s.data_path) == (None, None, None, None, None)
    assert s.batch_by_samples and s.interleave_branches and not s.random_time_offset and not s.chat_template


def test_flags_parse_to_typed_fields():
    s = parse_settings(["--batch_size", "4", "--temperature", "0.7", "--lora_rank", "8", "--data_path", "x.jsonl",
                        "--mask", "isolated", "--align", "right", "--on_error", "skip"])
    assert (s.batch_size, s.temperature, s.lora_rank, s.data_path) == (4, 0.7, 8, "x.jsonl")
    assert (s.mask, s.align, s.on_error) == ("isolated", "right", "skip")


@pytest.mark.parametrize("argv, value", [
    (["--patch_rope"], True), (["--no_patch_rope"], False), (["--patch_rope", "false"], False),
    (["--patch_rope", "1"], True), ([], None),
])
def test_bool_flags_come_in_pairs(argv, value):
    assert parse_settings(argv).patch_rope is value


def test_no_flag_for_every_bool():
    assert parse_settings(["--no_batch_by_samples", "--no_interleave_branches", "--random_time_offset",
                           "--chat_template", "--no_resume"]) == Settings(
        batch_by_samples=False, interleave_branches=False, random_time_offset=True, chat_template=True, resume=False)


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for name in field_names():
        assert f"--{name}" in text
        if isinstance(getattr(Settings(), name), bool) or name in ("patch_rope", "resume"):
            assert f"--no_{name}" in text


@pytest.mark.parametrize("argv", [["--bogus"], ["--batch_size", "x"], ["--mask", "diagonal"], ["--patch_rope", "maybe"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pmaccel: error: ")


def test_unknown_kwarg_is_named():
    with pytest.raises(PMAccelError, match="^batchsize: unknown setting"):
        settings_from_kwargs({"batchsize": 4})


@pytest.mark.parametrize("kwargs, field", [
    ({"batch_size": -1}, "batch_size"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"max_branches_per_sample": 2, "min_branches_per_sample": 3}, "max_branches_per_sample"),
    ({"on_error": "ignore"}, "on_error"), ({"dtype": "int8"}, "dtype"), ({"batch_size": "16"}, "batch_size"),
    ({"batch_size": True}, "batch_size"), ({"rope_2d_ratio": 0.0}, "rope_2d_ratio"), ({"out_path": ""}, "out_path"),
    ({"align": "center"}, "align"), ({"mask": "causal"}, "mask"),
])
def test_bad_values_fail_up_front(kwargs, field):
    with pytest.raises(PMAccelError, match=f"^{field}: "):
        settings_from_kwargs(kwargs)


def test_kwargs_override_a_base_and_paths_become_strings(tmp_path):
    base = Settings(batch_size=3, data_path=tmp_path / "rows.jsonl")
    s = settings_from_kwargs({"max_new_tokens": 5, "temperature": 1}, base=base)
    assert (s.batch_size, s.max_new_tokens, s.temperature, s.data_path) == (3, 5, 1.0, str(tmp_path / "rows.jsonl"))


def test_markdown_table_has_a_row_per_flag():
    table = settings_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(field_names())
    assert "`--patch_rope` / `--no_patch_rope`" in table and "columnar \\| isolated" in table
