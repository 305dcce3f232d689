"""Suite-wide settings. Tests use tiny models: one intra-op thread is much faster than two threads
contending on a busy 2-core machine (and keeps timings of the whole suite predictable on CI)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def dist_target(tmp_path_factory):
    """Folder of the exact-distribution tests' target: V = 8 (so joints over 3 tokens can be enumerated),
    weights large enough (std 0.6) that its distributions are far from uniform."""
    from dspark.models.random_init import build_random_model

    return build_random_model(
        tmp_path_factory.mktemp("dist") / "tiny", "tiny-qwen3", seed=2, init_std=0.6, with_tokenizer=False,
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
    )


@pytest.fixture(scope="session")
def trainer_target(tmp_path_factory):
    """Folder of the training tests' target: V = 40, 4 layers of width 32 (a drafter step takes milliseconds)."""
    from dspark.models.random_init import build_random_model

    return build_random_model(
        tmp_path_factory.mktemp("trainer") / "target", "tiny-qwen3", seed=6, init_std=0.3, with_tokenizer=False,
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )


@pytest.fixture(scope="session")
def dist_runner(dist_target):
    """The exact-distribution tests' target in float64."""
    from dspark.models.target_runner import TargetRunner

    return TargetRunner.from_pretrained(dist_target, dtype="float64")


@pytest.fixture(scope="session")
def distilled(dist_target, tmp_path_factory):
    """`distilled(kind)` → the folder of a drafter of that kind (tests/distilled.py: DSpark vanilla / gated /
    RNN, DFlash, EAGLE-3, MTP-1) distilled toward the dist_runner target, trained once per session."""
    from distilled import distill

    root = tmp_path_factory.mktemp("distilled")
    return lambda kind: distill(dist_target, kind, root)


@pytest.fixture
def saved_figures(monkeypatch):
    """{path: Figure} of every matplotlib figure saved during the test (the files are still written), so a
    test can check what a plot shows, not only that a file appeared (tests/figures.py checks the file)."""
    from pathlib import Path

    from matplotlib.figure import Figure

    saved, original = {}, Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(fname)] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved
