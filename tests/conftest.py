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
def dist_runner(tmp_path_factory):
    """Target of the exact-distribution tests: V = 8 (so joints over 3 tokens can be enumerated), weights
    large enough (std 0.6) that its distributions are far from uniform, float64."""
    from dspark.models.random_init import build_random_model
    from dspark.models.target_runner import TargetRunner

    folder = build_random_model(
        tmp_path_factory.mktemp("dist") / "tiny", "tiny-qwen3", seed=2, init_std=0.6, with_tokenizer=False,
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
    )
    return TargetRunner.from_pretrained(folder, dtype="float64")
