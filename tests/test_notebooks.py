"""Every notebook runs (small settings) and its .ipynb stays paired with its jupytext .py."""

from __future__ import annotations

import pathlib

import jupytext
import nbformat
import pytest
from conftest import requires_torch

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_ipynb_matches(path):
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {path}`"
    py_cells = [c.source for c in jupytext.read(path).cells]
    nb_cells = [c.source for c in nbformat.read(ipynb, as_version=4).cells]
    assert py_cells == nb_cells, f"{ipynb.name} is out of sync with {path.name}: run `jupytext --sync {path}`"


@requires_torch
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("GRANITE_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, so plots are outputs
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no plot"
