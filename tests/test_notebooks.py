from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SHOWS = {"tscd_lab.ipynb": "TSCD final (k=1)", "eval_tiny.ipynb": "| tiny-sd15 | 4 | UNet |",  # their tables
         "feedback_dmd_lab.ipynb": "DMD one-step LoRA (t=800)"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(SHOWS[path.name] in str(o.get("data", {})) for o in outputs)  # the table was shown
