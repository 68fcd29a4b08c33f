"""The `minisd` command: the README's preview job, and one-line errors with status 2."""

import subprocess
import sys

import pytest

from minisd.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "minisd", *args], capture_output=True, text=True)


def test_data_preview_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    r = run("data", "--dataset", "shapes", "--out", str(out), "-n", "8")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


@pytest.mark.parametrize("args,message", [
    (["data", "--dataset", "imagenet", "--out", "X/grid.png"], "error: unknown dataset 'imagenet'; allowed: 'shapes'"),
    (["data", "--split", "val", "--out", "OUT/grid.png"], "error: unknown split 'val'; allowed: 'train', 'test', 'heldout'"),
    (["data", "--out", "OUT/grid.txt"], "error: unknown output file type '.txt'; allowed: '.png'"),
    (["data", "--out", "OUT/missing/grid.png"], "error: folder"),
    (["data", "-n", "0", "--out", "OUT/grid.png"], "error: -n 0 is out of range; allowed: 1 … 256"),
    (["data", "-n", "many", "--out", "OUT/grid.png"], "error: argument -n: invalid int value: 'many'"),
    (["paint"], "error: argument command: invalid choice: 'paint'"),
])
def test_bad_input_prints_one_error_line_and_exits_2(tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    if args[-1].startswith("X/"):
        args[-1] = str(tmp_path / "grid.png")
    with pytest.raises(SystemExit) as e:
        sys.exit(main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_failed_run_leaves_an_existing_file_untouched(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"precious")
    r = run("data", "--split", "nope", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert out.read_bytes() == b"precious"
