"""Run the course notebooks for real and commit-ready: `python notebooks/regenerate.py [NAME ...]`.

Each notebook runs top to bottom in a fresh kernel with its real preset (`cpu`, or `gpu` when CUDA
is present; MINISD_QUICK is removed), is saved with its outputs, and is cleaned of execution
counts and volatile metadata so that a diff shows only what changed. Prints each run's time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop execution counts and per-run metadata; keep outputs and the widget state (so that a
    static viewer can still draw the widgets as they were left)."""
    widgets = nb.metadata.get("widgets")
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    if widgets:
        nb.metadata["widgets"] = widgets
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        cell.pop("id", None)
        if cell.cell_type == "code":
            cell.execution_count = None
            for out in cell.outputs:
                if "execution_count" in out:
                    out.execution_count = None
    nb.nbformat, nb.nbformat_minor = 4, 4


def run(path: Path, timeout: int = 3600) -> float:  # seconds per cell: training a preset on a busy CPU takes long
    nb = nbformat.read(path, as_version=4)
    os.environ.pop("MINISD_QUICK", None)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    clean(nb)
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)  # atomic: an interrupted run leaves the committed notebook as it was
    return seconds


def main(names: list[str]) -> None:
    paths = [HERE / n if n.endswith(".ipynb") else next(HERE.glob(f"{n}*.ipynb")) for n in names] \
        if names else sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for p in paths:
        print(f"{p.name}: running…", flush=True)
        print(f"{p.name}: {run(p):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
