"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A complete run folder (VAE, CLIP, U-Net) of the `tiny` preset, trained once per session
    through the command, exactly as a user would. Tests that change it must copy it first."""
    from minisd.cli import main

    out = tmp_path_factory.mktemp("runs") / "nested" / "tiny"  # train makes the missing parent too
    assert main(["train", "--preset", "tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on threads waiting on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
