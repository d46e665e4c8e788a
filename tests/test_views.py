"""pmaccel.views: the layout grid of a packed sample, built by hand from SPEC §2's times and groups, and
its HTML (escaped text, generated tokens marked)."""

from __future__ import annotations

from pmaccel.layout import append_outputs, pack_sample
from pmaccel.samples import TokenizedSample
from pmaccel.views import grid_html, layout_grid


class _Spell:
    def decode(self, ids, skip_special_tokens=False):
        return "<" if ids == [9] else f"t{ids[0]}"


def test_layout_grid_puts_each_token_at_its_time_in_its_group():
    prompt = pack_sample(TokenizedSample(main=[1, 2], branches=[[3], [4, 5]]))
    packed = append_outputs(prompt, [[6], [9]])
    grid = layout_grid(packed, prompt.num_tokens, _Spell(), ["main", "branch 1", "branch 2"])
    # left alignment: main at times 0-1, both branches start at time 2; outputs follow each branch
    assert grid.times == [0, 1, 2, 3, 4]
    assert grid.cells == [["t1", "t2", "", "", ""], ["", "", "t3", "t6", ""], ["", "", "t4", "t5", "<"]]
    assert grid.generated[1] == [False, False, False, True, False] and grid.generated[2][4]
    page = grid_html(grid)
    assert "&lt;" in page and "<td>&lt;" not in page and page.count("<tr") == 4  # header + 3 groups
