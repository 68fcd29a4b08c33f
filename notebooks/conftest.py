# The notebooks run as tests (nbval) in quick mode: each picks the `tiny` preset and finishes in
# well under a minute. The kernel inherits this process's environment.
import os

os.environ["MINISD_QUICK"] = "1"
# An exercise's solution cell ends with its check: here a wrong answer fails the test (for a learner,
# `minisd.exercises.check` only prints).
os.environ["MINISD_CHECK_STRICT"] = "1"
collect_ignore = ["regenerate.py"]


def pytest_collection_modifyitems(items):
    # Committed notebooks keep the outputs of a real run for readers, without execution counts.
    # nbval refuses a cell that has outputs but no count ("Unrun reference cell has outputs"),
    # although lax mode compares none of them; so the test runs each cell against no reference.
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and cell.get("execution_count") is None and cell.get("outputs"):
            cell.outputs = []
