"""Both notebooks run top to bottom (nbclient, CPU, the embedded SmolLM2) and show what they promise.

The kernel is this interpreter, through a ``python3`` kernelspec written to a temporary
``JUPYTER_PATH`` (so no kernel has to be installed, and none installed elsewhere is picked up).
"""

import json
import os
from pathlib import Path

import nbformat
import pytest
from helpers_notebooks import NOTEBOOKS, WIDGET_MIME, write_kernelspec
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

def text_of(cell) -> str:
    """Everything a code cell printed or displayed, as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def run_notebook(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebooks")
    jupyter = write_kernelspec(tmp_path_factory.mktemp("jupyter"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join([str(jupyter), os.environ.get("JUPYTER_PATH", "")]))
        mp.delenv("PMACCEL_RESULTS", raising=False)  # inspect.ipynb reads what quickstart.ipynb wrote
        quickstart = run_notebook("quickstart.ipynb", work)
        inspect = run_notebook("inspect.ipynb", work)
    return work, quickstart, inspect


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_quickstart_writes_records_with_an_answer_per_branch(executed):
    work, nb, _ = executed
    from pmaccel.rows import example_path

    inputs = [json.loads(line) for line in example_path().read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in (work / "quickstart_results.jsonl").read_text().splitlines()]
    assert len(records) == len(inputs)
    for row, rec in zip(inputs, records, strict=True):
        assert {k: rec[k] for k in row} == row  # the row's own fields, carried
        assert len(rec["outputs"]) == len(row["branches"])
        assert all(out.strip() for out in rec["outputs"]), rec  # a non-empty answer per branch
        assert all(0 < n <= 16 for n in rec["num_generated_tokens"])

    cells = code_cells(nb)
    assert f"{len(records)} records written to quickstart_results.jsonl" in text_of(cells[1])
    table = next(o for o in cells[2]["outputs"] if o["output_type"] == "execute_result")["data"]["text/html"]
    assert table.count("<tr") == 1 + sum(len(r["branches"]) for r in records)  # header + one row per branch
    assert all(str(r["id"]) in table for r in records)
    launched = text_of(cells[3])
    assert "Launching training on CPU." in launched and f"{len(records)} records read back" in launched
    assert text_of(cells[4]) == "True"  # the launched job wrote the same file
    assert (work / "quickstart_launched.jsonl").read_text() == (work / "quickstart_results.jsonl").read_text()


def test_inspect_notebook_shows_the_widget_and_every_branch(executed):
    work, _, nb = executed
    cells = code_cells(nb)
    assert all(o["output_type"] != "error" for c in cells for o in c.get("outputs", []))
    assert any(WIDGET_MIME in o.get("data", {}) for o in cells[1]["outputs"])  # the app is displayed
    printed = text_of(cells[2]).splitlines()
    first = json.loads((work / "quickstart_results.jsonl").read_text().splitlines()[0])
    assert printed[0] == f"sample 0 id {first['id']} | mask: isolated"
    branch_lines = [line for line in printed if line.startswith("branch ")]
    assert [line.split(": ", 1)[1] for line in branch_lines] == [repr(o) for o in first["outputs"]]
    assert all(len(eval(line.split(": ", 1)[1])) > 0 for line in branch_lines)
    assert printed[-len(first["branches"]) - 2].startswith("['main', 'branch 1'")  # the attention matrix follows
    # the widget state is saved with the notebook: the picker covers every sample
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    sliders = [m["state"] for m in state.values() if m["model_name"] == "IntSliderModel"]
    assert any(s.get("description") == "sample" and s["max"] == 4 for s in sliders)
