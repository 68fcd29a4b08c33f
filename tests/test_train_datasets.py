"""Training the whole model on something other than Shapes: a folder of the user's own captioned
images, through the command, then sampling from it."""

import json

import numpy as np
import pytest
from PIL import Image

from minisd.cli import main


def _write_folder(folder, n=64):
    """Two kinds of picture, each with its caption in image.txt: a bright top half or a bright left half."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros((40, 40, 3), np.uint8)  # not the training size: the loader resizes
        if i % 2:
            img[:20] = (220, 40, 40)
            text = "a red top"
        else:
            img[:, :20] = (40, 80, 230)
            text = "a blue left"
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(text + "\n")


def test_a_run_on_your_own_captioned_images_trains_and_samples(tmp_path, capsys):
    _write_folder(tmp_path / "mine")
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(tmp_path / "mine"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '--prompt "a red top"' in printed or '--prompt "a blue left"' in printed
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == str(tmp_path / "mine") and set(config["stages"]) == {"vae", "clip", "unet"}
    vocab = json.loads((out / "tokenizer.json").read_text())["vocab"]
    assert {"red", "top", "blue", "left"} <= set(vocab) and "circle" not in vocab  # words of these captions
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(out), "--prompt", "a red top", "-n", "2", "--steps", "5",
                 "--out", str(png)]) == 0 and png.is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 2  # the judge knows only Shapes, and says so
    assert "measures Shapes and emoji runs" in capsys.readouterr().err
    # a run keeps its dataset: retraining a stage on another one is refused
    assert main(["train", "--preset", "tiny", "--dataset", "shapes", "--stages", "unet", "--out", str(out)]) == 2
    assert "trained on" in capsys.readouterr().err


@pytest.mark.parametrize("dataset,says", [
    ("mnist", "MNIST not found"),
    ("cifar10", "not found"),
    ("no/such/folder", "no/such/folder"),
])
def test_train_on_missing_data_fails_before_writing_anything(tmp_path, capsys, dataset, says):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", dataset, "--root", str(tmp_path / "data"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1
    assert not out.exists()
