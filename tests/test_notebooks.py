"""Every notebook runs (small settings) and its .ipynb stays paired with its jupytext .py."""

from __future__ import annotations

import pathlib

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_ipynb_matches(path):
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {path}`"
    py_cells = [c.source for c in jupytext.read(path).cells]
    nb_cells = [c.source for c in nbformat.read(ipynb, as_version=4).cells]
    assert py_cells == nb_cells, f"{ipynb.name} is out of sync with {path.name}: run `jupytext --sync {path}`"


@pytest.mark.torch
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    from granite_jax.testing.speech import have_espeak

    if path.stem == "finetune" and not have_espeak():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng) for its corpus")

    monkeypatch.setenv("GRANITE_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what a notebook leaves in its temporary folders goes with tmp_path
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, so plots are outputs
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no plot"


def test_memory_study_guard(monkeypatch):
    """The memory-study notebook's helper: analytic 6-D size, and the broadcast form is never run past the limit."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent.parent / "benchmarks"))
    import memory_study as ms

    assert "memory_study" in [p.stem for p in NOTEBOOKS]
    assert ms.intermediate_bytes(4) == 1 * 1 * 8 * 200 * 200 * 128 * 4  # one block: (1, 1, 8, 200, 200, 128) fp32
    assert ms.intermediate_bytes(30, batch=8) == 64 * ms.intermediate_bytes(4)
    ran = []
    monkeypatch.setattr(
        ms, "measure", lambda v, s, **kw: ran.append((v, s)) or {"variant": v, "seconds": s, "delta": 0, "time": 0.0}
    )
    rows = ms.study([4, 240], limit_gb=6.0, progress=False)
    assert ("torch-broadcast", 240) not in ran and len(ran) == 5
    assert [r for r in rows if "skipped" in r] == [
        {"variant": "torch-broadcast", "seconds": 240, "skipped": "6-D intermediate 9.8 GB > 6 GB"}
    ]
    assert "skipped" in ms.markdown_table(rows)
