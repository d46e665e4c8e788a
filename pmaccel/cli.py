"""``pmaccel [flags]`` / ``python -m pmaccel [flags]`` / ``accelerate launch -m pmaccel [flags]``,
and ``pmaccel score [flags]`` (the same launchers).

A thin entry point: flags -> ``Settings`` -> ``infer`` (or ``score``). A bad input or setting is one
line on stderr (``pmaccel: error: file:row: field: problem``) and exit status 2.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence

from pmaccel.errors import PMAccelError

PREVIEW_RECORDS = 3
SCORE_DESCRIPTION = ("Score given continuations under the packed layout (teacher-forced log-likelihood, "
                     "perplexity, multiple choice): the same flags, launchers and ordered, resumable output "
                     "as `pmaccel`. Without --data_path: the shipped easy multiple-choice set.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run pmaccel with command-line flags (``pmaccel --help`` lists them).

    Args:
        argv: the flags; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on a bad input or setting (argparse's own errors exit 2 too).

    Example:
        >>> main(["--data_path", "rows.jsonl", "--out_path", "out.jsonl"])  # doctest: +SKIP
        0
        >>> main(["score", "--data_path", "heldout.jsonl", "--out_path", "scores.jsonl"])  # doctest: +SKIP
        0
    """
    from pmaccel.settings import parse_settings

    argv = list(sys.argv[1:] if argv is None else argv)
    scoring = argv[:1] == ["score"]
    try:
        if scoring:
            settings = parse_settings(argv[1:], prog="pmaccel score", description=SCORE_DESCRIPTION)
            from pmaccel.scoring import score

            records = score(settings)
        else:
            settings = parse_settings(argv)
            from pmaccel.run import infer

            records = infer(settings)
    except PMAccelError as e:
        # under a launcher every rank meets the same input error: the main one says it, once
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pmaccel: error: {e}", file=sys.stderr, flush=True)
        return 2
    if records is not None and settings.data_path is None and not scoring:  # the demo: show what came out
        _print_preview(records)
    return 0


def _print_preview(records: list[dict]) -> None:
    for record in records[:PREVIEW_RECORDS]:
        print("-" * 72)
        if record.get("main"):
            print(textwrap.shorten(record["main"], 200))
        for branch, out in zip(record.get("branches", []), record.get("outputs", [])):
            text = branch if isinstance(branch, str) else branch.get("text", branch)
            print(f"  > {textwrap.shorten(str(text), 100)}\n    {textwrap.shorten(out, 200)!r}")
