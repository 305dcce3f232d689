"""Drafters distilled toward a tiny test target, so that lossless tests exercise acceptance.

A drafter with random weights is almost never accepted (DFlash: 19 of 72,000 verified drafts), so an
exact-distribution test with it mostly tests plain sampling, and a greedy test barely exercises multi-token
acceptance and the drafter's cache rollback. `distill` trains each drafter kind briefly with the project's
own trainer (`dspark.training.trainer.Trainer`, the kind's preset) on sequences the target generated
itself — sampled at temperature 1 and greedy, from random prompts and from the prompt of the
exact-distribution tests — which brings acceptance to 40–70 % in a few seconds on one CPU core.

Everything is seeded, so a distilled drafter is the same on every run. Set DSPARK_TEST_CACHE to a folder
to reuse distilled drafters across pytest processes (the mutation check does: it distils once with the
unmutated code, then runs every mutant against the same drafters).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

KINDS = ("dspark", "dspark-gated", "dspark-rnn", "dflash", "eagle3", "mtp")
BLOCK_SIZE = 3  # drafts per round (MTP: 1)
STEPS = 300
DISTRIBUTION_PROMPT = [7, 3, 7, 3, 7]  # test_sampling_distribution.PROMPT


def recipe(kind: str, target: Path, out: Path) -> list[str]:
    """`dspark train` overrides of a kind's distillation run."""
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; choose one of {', '.join(KINDS)}")
    overrides = [
        f"preset={kind}", f"model.target={target}", "model.draft_layers=1", "model.init_std=0.05",
        f"model.block_size={1 if kind == 'mtp' else BLOCK_SIZE}",
        "model.target_layer_ids=[1]" if kind == "mtp" else "model.target_layer_ids=[0, 1]",
        "data.train=distilled-in-memory.jsonl", "data.num_anchors=8", "data.max_length=32",
        "optim.lr=3e-3", "optim.warmup_ratio=0.05",
        f"train.output_dir={out}", "train.batch_size=16", "train.micro_batch_size=16", f"train.max_steps={STEPS}",
        f"train.checkpoint_every={STEPS}", "train.log_every=1000", "train.progress=false", "train.device=cpu",
        "train.dtype=float32", "train.seed=0",
    ]
    if kind.startswith("dspark"):
        overrides.append("model.markov_rank=8")
    return overrides


def training_samples(runner) -> list:
    """The target's own continuations (20 tokens) of 256 random prompts and of the distribution tests' prompt,
    sampled at temperature 1 and greedy; loss on the continuation and the prompt's last position."""
    from dspark.decoding.sampling import SamplingParams
    from dspark.engine.generation import generate
    from dspark.training.trainer import Sample

    vocab = runner.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(256)]
    prompts += [DISTRIBUTION_PROMPT] * 64
    samples = []
    for temperature in (1.0, 0.0):
        out = generate(runner, prompts, sampling=SamplingParams(temperature=temperature), max_new_tokens=20, seed=1)
        for prompt, seq in zip(prompts, out.sequences):
            mask = [False] * (len(prompt) - 1) + [True] * (len(seq.token_ids) + 1)
            samples.append(Sample(torch.tensor(prompt + seq.token_ids), torch.tensor(mask)))
    return samples


def _key(target: Path, kind: str) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((target / name).read_bytes())
    digest.update(json.dumps(recipe(kind, Path("T"), Path("O"))).encode())
    return f"{kind}-{digest.hexdigest()[:16]}"


def distill(target: Path, kind: str, root: Path) -> Path:
    """The drafter folder of `kind` distilled toward the target folder `target`, trained once into `root`
    (or $DSPARK_TEST_CACHE) and reused."""
    from dspark.models.target_runner import TargetRunner
    from dspark.training.config import load_train_config
    from dspark.training.trainer import Trainer

    cache = Path(os.environ.get("DSPARK_TEST_CACHE") or root)
    folder = cache / _key(target, kind)
    if (folder / "config.json").is_file():
        return folder
    work = cache / f".{folder.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    runner = TargetRunner.from_pretrained(target, device="cpu", dtype="float32")
    config = load_train_config(None, recipe(kind, target, work))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        final = Trainer(config, training_samples(runner), target=runner).fit()
        tmp = cache / f".{folder.name}.tmp-{os.getpid()}"
        shutil.copytree(final / "drafter", tmp)
        try:
            os.rename(tmp, folder)  # atomic; another process may have finished the same drafter first
        except OSError:
            shutil.rmtree(tmp)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return folder
