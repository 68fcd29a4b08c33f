"""The `minisd` command: the README's preview job, and one-line errors with status 2."""

import json
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


@pytest.fixture
def clip_run(tiny_run):
    return tiny_run


def test_train_writes_a_run_folder_and_eval_prints_and_stores_figures(clip_run, capsys):
    for name in ("config.json", "metrics.json", "tokenizer.json", "text_encoder/model.safetensors",
                 "text_encoder/config.json", "clip/model.safetensors", "clip/config.json",
                 "vae/model.safetensors", "vae/config.json"):
        assert (clip_run / name).is_file(), name
    config = json.loads((clip_run / "config.json").read_text())
    assert config["preset"] == "tiny" and set(config["stages"]) == {"vae", "clip", "unet"} and config["seed"] == 0
    assert config["stages"]["vae"]["scale_factor"] != 1.0  # computed from data after training
    capsys.readouterr()
    assert main(["eval", "--run", str(clip_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("vae ")):]  # after "training the judge"
    assert lines[0].startswith("vae  test     reconstruction:") and "dB PSNR" in lines[0]
    sd_lines = [line for line in lines if line.startswith("sd ")]
    assert sd_lines[0].startswith("sd   test     judge on real images:") and sd_lines[1].startswith("sd   heldout")
    assert sum("prompt accuracy all" in line for line in lines) == 4  # two samplers × two prompt sets
    clip_lines = [line for line in lines if line.startswith("clip")]
    assert clip_lines[0].startswith("clip test") and "zero_shot_color" in clip_lines[0]
    assert clip_lines[1].startswith("clip heldout")
    metrics = json.loads((clip_run / "metrics.json").read_text())
    assert metrics["train"]["clip"]["steps"] > 0 and metrics["train"]["vae"]["steps"] > 0
    assert metrics["eval"]["vae/test"]["psnr_db"] > 0
    figures = metrics["eval"]["clip/test"]
    assert set(figures) >= {"zero_shot_color", "zero_shot_shape", "zero_shot_size", "zero_shot_position",
                            "text_to_image_r1_of_100"}
    assert all(0 <= v <= 1 for v in figures.values())


@pytest.mark.parametrize("args,message", [
    (["train", "--preset", "huge", "--out", "OUT/run"], "error: unknown preset 'huge'; allowed: 'tiny', 'cpu', 'gpu'"),
    (["train", "--preset", "tiny", "--stages", "unet2", "--out", "OUT/run"], "error: unknown stage 'unet2'; allowed:"),
    (["eval", "--run", "OUT/nothing"], "error: run folder"),
    (["eval", "--run", "OUT"], "error: " + repr("OUT") + " has no trained component"),
])
def test_train_and_eval_reject_bad_input(tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    message = message.replace("'OUT'", repr(str(tmp_path)))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_cannot_make_a_run_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "file.txt" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot make run folder") and "file.txt' is a file" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"] and (tmp_path / "file.txt").read_text() == "mine"


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", "--preset", "tiny", "--stages", "clip", "--out", str(tmp_path)]) == 2
    assert "is not a minisd run folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_eval_of_a_corrupt_checkpoint_is_a_clear_error_and_damages_nothing(clip_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clip_run, run)
    weights = run / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
