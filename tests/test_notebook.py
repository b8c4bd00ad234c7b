"""notebooks/quickstart.ipynb runs top to bottom (shortened by MR1JAX_NOTEBOOK_QUICK) and shows real results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch, capsys):
    matplotlib.use("Agg")
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) == 5
    monkeypatch.setenv("MR1JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MR1JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.chdir(ROOT / "notebooks")                      # as Jupyter starts it
    namespace: dict = {"__name__": "__main__"}
    for src in cells:
        exec(compile(src, "quickstart.ipynb", "exec"), namespace)
    out = capsys.readouterr().out
    assert "counting  accuracy" in out and "geometry  accuracy" in out
    assert len(namespace["samples"]) == 8
    for s in namespace["samples"]:
        assert isinstance(s["completion"], str) and s["accuracy"] in (0.0, 1.0) and s["format"] in (0.0, 1.0)
    assert (tmp_path / "run" / "curves.png").exists()
    assert "gradient norm" in out and np.isfinite(float(out.split("gradient norm")[1].split()[0]))
    os.chdir(ROOT)
