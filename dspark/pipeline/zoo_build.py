"""`dspark zoo rebuild`: reproduce the built-in model from scratch (dspark.models.zoo has the layout).

Steps, each resumable (a finished step's output is reused; an interrupted pretraining or drafter run
resumes from its last checkpoint; regeneration resumes by sample id):
  1. corpus     dspark.pipeline.corpus.build_corpus                     → WORK/corpus
  2. tokenizer  byte-level BPE on the training files                    → WORK/tokenizer
  3. target     dspark pretrain with PRETRAIN_OVERRIDES                 → WORK/pretrain/model
  4. data       the target regenerates answers to the corpus's training prompts (sampled, REGEN_*)
                                                                         → WORK/regenerated.jsonl
                and caches its features at the drafters' shared layers  → WORK/features
  5. drafters   the five drafters of BUILTIN_DRAFTERS (stored in bfloat16), same data, same target layers, block size 7
                (MTP-1: one token), each first trained with one draft layer so its forward costs about a
                quarter of the target's eleven layers (same vocabulary head)  → WORK/drafters/<name>
                then the parallel ones of GROWN_DRAFTERS grown to GROWN_DRAFT_LAYERS (matched drafting cost:
                one block pass of that depth costs no more than EAGLE-3's seven dependent steps, docs/
                benchmarks.md) and trained on (GROW_OVERRIDES; DSpark's with the greedy confidence output)
                                                                         → WORK/drafters/<name>-grown
  6. calibrate  Platt scaling for the confidence heads of CALIBRATED_DRAFTERS on CALIBRATION_PROMPTS
                training-pool prompts that regeneration did not use (so evaluation sets stay out of sample),
                one regime per sampling temperature (1 and 0)                → WORK/calibration-<name>.json
                (the recorded raw-head rounds: WORK/calibration-<name>-traces-t<T>.json)
  7. install    copy target, drafters (each with its calibration) and the held-out prompt files into OUT
                (default: the package's builtin folder) and write manifest.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dspark.config import to_dict
from dspark.devices import resolve_device
from dspark.files import exclusive_lock, write_text_atomically
from dspark.models.zoo import BUILTIN_DIR, BUILTIN_DRAFTERS

PRETRAIN_OVERRIDES = [
    "model.vocab_size=4096", "model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=11",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=64",
    "model.max_position_embeddings=2048", "data.seq_len=256", "data.chat_fraction=0.5", "optim.lr=2e-3",
    "train.max_steps=650", "train.batch_size=16", "train.checkpoint_every=50", "train.eval_every=130",
]
REGEN_PROMPTS = 1200
REGEN_MAX_NEW_TOKENS = 128
REGEN_BATCH_SIZE = 16
# The paper regenerates "with recommended sampling parameters" (§4.1); DeepSpec's Qwen3 defaults are
# temperature 0.7, top-p 0.8, top-k 20 (docs/design.md §2.6). Sampled rather than greedy answers keep the
# drafters' training contexts close to the T = 1 text they are evaluated on (greedy answers of a small
# target are repetitive, which inflated the confidence head's position-1 estimate at T = 1).
REGEN_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
REGEN_SEED = 0
CALIBRATION_PROMPTS = 600
CALIBRATION_MAX_NEW_TOKENS = 64
DRAFTER_PRESETS = {"dspark": "dspark", "dspark-rnn": "dspark-rnn", "dflash": "dflash", "eagle3": "eagle3", "mtp": "mtp"}
DRAFTER_OVERRIDES = [
    "model.draft_layers=1", "model.block_size=7", "model.target_layer_ids=[1,5,9]", "data.max_length=512",
    "data.num_anchors=64", "optim.lr=1e-3", "train.batch_size=8", "train.epochs=1", "train.max_steps=1600",
    "train.checkpoint_every=100", "train.log_every=10", "train.chunk_blocks=64",
]
# Each drafter's markov_rank comes from its preset (0 where there is no Markov head); DSpark's rank is scaled
# with the width as in the paper (256 for hidden 2560 → 32 for hidden 256). MTP reads the last layer and
# trains 400 steps: at 1,600 (10.7 passes over the 1,200 answers) its τ fell from 1.47 to 1.41 at temperature 1
# and from 1.90 to 1.86 at 0 (docs/benchmarks.md), while every block drafter gained from the longer run.
DRAFTER_KIND_OVERRIDES = {
    "dspark": ["model.markov_rank=32"], "dspark-rnn": ["model.markov_rank=32"],
    "mtp": ["model.block_size=1", "model.target_layer_ids=null", "train.max_steps=400"],
}
# Growing (docs/design.md §2.6): the one-layer parallel drafters start a second run at GROWN_DRAFT_LAYERS
# layers, the new layers starting as the identity (`warm_start`), so the grown drafter first computes what the
# one-layer one did. Three layers: the deepest block pass whose draft step costs no more than EAGLE-3's
# chain of seven one-layer steps both at 1 and at 16 requests on the CPU (docs/benchmarks.md, drafter cost).
GROWN_DRAFTERS = ("dspark", "dspark-rnn", "dflash")
GROWN_DRAFT_LAYERS = 3
GROW_OVERRIDES = ["train.max_steps=800", "optim.lr=5e-4"]
GROW_KIND_OVERRIDES = {"dspark": ["model.greedy_confidence_head=true"], "dspark-rnn": ["model.greedy_confidence_head=true"]}
CALIBRATED_DRAFTERS = ("dspark", "dspark-rnn")


def _log(message: str) -> None:
    print(f"[zoo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_target(work: Path, *, device: str, progress: bool, stdlib_dir=None, docs_dir=None) -> Path:
    from dspark.pipeline.corpus import build_corpus
    from dspark.pipeline.pretrain import Pretrainer, load_pretrain_config
    from dspark.pipeline.tokenizer_training import train_tokenizer

    corpus = work / "corpus"
    if not (corpus / "manifest.json").is_file():
        _log("building the corpus")
        build_corpus(corpus, stdlib_dir=stdlib_dir, docs_dir=docs_dir, cache_dir=work / "debs")
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        _log("training the tokenizer")
        train_tokenizer(corpus, tokenizer)
    model = work / "pretrain" / "model"
    if not (model / "config.json").is_file():
        _log("pretraining the target")
        config = load_pretrain_config(None, PRETRAIN_OVERRIDES + [
            f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"train.output_dir={work / 'pretrain'}",
            f"train.device={device}", f"train.progress={str(progress).lower()}",
        ])
        Pretrainer(config).fit()
    return model


def build_training_data(work: Path, target: Path, *, device: str, progress: bool) -> Path:
    from dspark.decoding.sampling import SamplingParams
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer, stop_token_ids
    from dspark.models.fingerprint import model_fingerprint
    from dspark.data.samples import read_samples
    from dspark.training.regenerate import regenerate

    output = work / "regenerated.jsonl"
    _log("regenerating training answers with the target")
    tokenizer = load_tokenizer(target)
    runner = TargetRunner.from_pretrained(target, device=device)
    regenerate(
        runner, tokenizer, read_samples(work / "corpus" / "train-prompts.jsonl"), output,
        stop_token_ids=stop_token_ids(target, tokenizer, runner.config.eos_token_ids),
        target_identity=model_fingerprint(target), sampling=SamplingParams(**REGEN_SAMPLING),
        max_new_tokens=REGEN_MAX_NEW_TOKENS, batch_size=REGEN_BATCH_SIZE, seed=REGEN_SEED, limit=REGEN_PROMPTS,
        progress=progress,
    )
    return output


def build_features(work: Path, target: Path, data: Path, *, device: str, progress: bool) -> Path:
    """One bfloat16 feature cache (docs/design.md §2.1: the raw outputs of the shared target layers and the final hidden
    state) for every drafter reading the DSpark recipe's `model.target_layer_ids`: the target runs over the
    regenerated data once instead of once per drafter step."""
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer
    from dspark.models.fingerprint import model_fingerprint
    from dspark.training.feature_cache import build_feature_cache
    from dspark.data.samples import read_samples

    output = work / "features"
    if (output / "manifest.json").is_file():
        return output
    _log("caching the target's features for drafter training")
    shared = _recipe("dspark")
    runner = TargetRunner.from_pretrained(target, device=device)
    build_feature_cache(runner, load_tokenizer(target), read_samples(data), output,
                        layer_ids=shared.model.target_layer_ids, target_identity=model_fingerprint(target),
                        max_length=shared.data.max_length, source=str(data), progress=progress, log=_log)
    return output


def drafter_data(name: str, regenerated: Path, features: Path) -> Path:
    """The feature cache for drafters that read the shared target layers; the regenerated JSONL (features
    computed online) for one that reads other layers (MTP-1: the last layer)."""
    shared = _recipe(name).model.target_layer_ids == _recipe("dspark").model.target_layer_ids
    return features if shared else regenerated


def _recipe(name: str):
    """The typed training config of drafter `name`'s recipe (paths left as placeholders)."""
    from dspark.training.config import load_train_config

    return load_train_config(None, drafter_overrides(name, Path("TARGET"), Path("DATA"), Path("OUT"), "cpu", False))


def drafter_overrides(name: str, target: Path, data: Path, out: Path, device: str, progress: bool) -> list[str]:
    return [f"preset={DRAFTER_PRESETS[name]}", *DRAFTER_OVERRIDES, *DRAFTER_KIND_OVERRIDES.get(name, []),
            f"model.target={target}", f"data.train={data}", f"train.output_dir={out}", f"train.device={device}",
            f"train.progress={str(progress).lower()}"]


def train_drafter(name: str, work: Path, target: Path, data: Path, *, device: str, progress: bool) -> Path:
    """Drafter `name`'s one-layer run, then for GROWN_DRAFTERS the grown run started from it; returns the
    final (bfloat16) folder of the last run."""
    out = work / "drafters" / name
    first = _train_run(out, drafter_overrides(name, target, data, out, device, progress), f"training drafter {name}")
    if name not in GROWN_DRAFTERS:
        return first
    out = work / "drafters" / f"{name}-grown"
    return _train_run(out, grow_overrides(name, target, data, first, out, device, progress),
                      f"growing drafter {name} to {GROWN_DRAFT_LAYERS} layers")


def grow_overrides(name: str, target: Path, data: Path, start: Path, out: Path, device: str, progress: bool) -> list[str]:
    """The grown run's recipe: the one-layer recipe, then GROWN_DRAFT_LAYERS layers started from `start`."""
    return [*drafter_overrides(name, target, data, out, device, progress), f"model.draft_layers={GROWN_DRAFT_LAYERS}",
            f"model.init_from={start}", *GROW_OVERRIDES, *GROW_KIND_OVERRIDES.get(name, [])]


def drafter_manifest(name: str) -> dict:
    """The recipe of built-in drafter `name` as the manifest records it (paths as placeholders)."""
    data = drafter_data(name, Path("DATA"), Path("FEATURES"))
    entry = {"recipe": drafter_overrides(name, Path("TARGET"), data, Path("OUT"), "cpu", False)}
    if name in GROWN_DRAFTERS:
        entry["grown"] = grow_overrides(name, Path("TARGET"), data, Path("ONE_LAYER_FINAL"), Path("OUT"), "cpu", False)
    return entry


def _train_run(out: Path, overrides: list[str], message: str) -> Path:
    from dspark.training.config import load_train_config
    from dspark.training.data_loading import load_samples
    from dspark.training.trainer import Trainer

    final = out / "final"
    if (final / "config.json").is_file():
        return final
    _log(message)
    config = load_train_config(None, overrides)
    trainer = Trainer(config, load_samples(config.data.train, config.model.target, config.data.max_length,
                                           config.model.drafter))
    checkpoint = trainer.fit()
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "drafter", tmp)
    to_bfloat16(tmp)
    tmp.rename(final)
    return final


def to_bfloat16(folder: Path) -> None:
    """Store a model folder's floating-point tensors in bfloat16 (as the released DSpark drafters are): the
    frozen embedding / LM head copies are the bf16 target's values exactly; the trained weights are rounded.
    Halves the shipped size; the loaders upcast to the compute dtype."""
    import torch
    from safetensors.torch import load_file

    from dspark.models.checkpoint import save_safetensors

    path = folder / "model.safetensors"
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_safetensors(tensors, path)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def calibrate_drafter(work: Path, target: Path, drafter: Path, name: str = "dspark", *, device: str,
                      progress: bool) -> Path:
    """Fit the confidence calibration of `drafter` on unused training-pool prompts (raw head, verify-all), one
    regime per sampling temperature of DEFAULT_SAMPLING_TEMPERATURES → WORK/calibration-<name>.json."""
    from dspark.calibration.calibration_file import DEFAULT_SAMPLING_TEMPERATURES
    from dspark.calibration.fitting import fit_and_save
    from dspark.evaluation.datasets import load_set
    from dspark.evaluation.offline import EvalSettings, evaluate
    from dspark.evaluation.traces import drafter_rounds

    out = work / f"calibration-{name}.json"
    if out.is_file():
        return out
    _log(f"calibrating drafter {name}'s confidence head")
    lines = (work / "corpus" / "train-prompts.jsonl").read_text().splitlines()
    prompts = work / "calibration-prompts.jsonl"
    write_text_atomically(prompts, "\n".join(lines[REGEN_PROMPTS:REGEN_PROMPTS + CALIBRATION_PROMPTS]) + "\n")
    prompt_set = load_set("calibration", "corpus", prompts, limit=None, seed=0)
    per_temperature, block_size = {}, None
    for temperature in DEFAULT_SAMPLING_TEMPERATURES:
        settings = EvalSettings(temperature=temperature, max_new_tokens=CALIBRATION_MAX_NEW_TOKENS, seed=0, batch_size=16)
        _, traces = evaluate(str(target), [str(drafter)], [prompt_set], settings, device=device, progress=progress,
                             calibration="none")
        rounds = drafter_rounds(traces, next(iter(traces)), "calibration rounds")
        rounds_file = work / f"calibration-{name}-traces-t{temperature:g}.json"
        rounds_file.write_text(json.dumps(traces) + "\n")
        per_temperature[temperature] = rounds.fit_data()
        block_size = per_temperature[temperature].block_size
    summary = fit_and_save(per_temperature, drafter, block_size, out)
    for regime in summary["regimes"]:
        _log(f"{name}, sampling temperature {regime['sampling_temperature']:g}: ECE before "
             f"{regime['ece_before']['mean']:.4f}, after {regime['ece_after']['mean']:.4f} (held-out prompts)")
    return out


def install(work: Path, target: Path, drafters: dict[str, Path], out: Path,
            calibrations: dict[str, Path] | None = None) -> dict:
    """Copy the built artefacts into `out` (replacing what was there; each calibration into its drafter's
    folder as DRAFTER_CALIBRATION) and write manifest.json."""
    from dspark.calibration.calibration_file import DRAFTER_CALIBRATION

    calibrations = calibrations or {}
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(target, staging / "target")
    for name, folder in drafters.items():
        shutil.copytree(folder, staging / "drafters" / name)
    (staging / "prompts").mkdir()
    shutil.copy(work / "corpus" / "prompts-code.jsonl", staging / "prompts" / "corpus-code.jsonl")
    shutil.copy(work / "corpus" / "prompts-prose.jsonl", staging / "prompts" / "corpus-prose.jsonl")
    for name, calibration in calibrations.items():
        shutil.copy(calibration, staging / "drafters" / name / DRAFTER_CALIBRATION)
    report = json.loads((target / "pretrain_report.json").read_text())
    manifest = {
        "format": "dspark-zoo-v1",
        "built": time.strftime("%Y-%m-%d"),
        "corpus": json.loads((work / "corpus" / "manifest.json").read_text()),
        "target": {"parameters": report["parameters"], "steps": report["steps"], "tokens_seen": report["tokens_seen"],
                   "heldout_loss_nats": report["heldout_loss_nats"], "heldout_perplexity": report["heldout_perplexity"],
                   "recipe": PRETRAIN_OVERRIDES},
        "drafters": {name: drafter_manifest(name) for name in drafters},
        "regeneration": {"prompts": REGEN_PROMPTS, "max_new_tokens": REGEN_MAX_NEW_TOKENS, "sampling": REGEN_SAMPLING,
                         "seed": REGEN_SEED},
        "calibration": {name: json.loads(path.read_text()) for name, path in calibrations.items()},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def rebuild(work: str | Path, out: str | Path = BUILTIN_DIR, *, device: str = "auto", drafters=BUILTIN_DRAFTERS,
            progress: bool = True, stdlib_dir=None, docs_dir=None) -> dict:
    """Every step above, each skipped when its result is in `work` already; one rebuild per `work` folder at
    a time (a second one refuses at once: `dspark.files.exclusive_lock`)."""
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(work, "--work"):
        return _rebuild_locked(work, out, device=str(resolve_device(device, "--device")), drafters=drafters,
                               progress=progress, stdlib_dir=stdlib_dir, docs_dir=docs_dir)


def _rebuild_locked(work: Path, out: Path, *, device: str, drafters, progress: bool, stdlib_dir, docs_dir) -> dict:
    target = build_target(work, device=device, progress=progress, stdlib_dir=stdlib_dir, docs_dir=docs_dir)
    data = build_training_data(work, target, device=device, progress=progress)
    features = build_features(work, target, data, device=device, progress=progress)
    built = {name: train_drafter(name, work, target, drafter_data(name, data, features), device=device,
                                 progress=progress) for name in drafters}
    calibrations = {name: calibrate_drafter(work, target, built[name], name, device=device, progress=progress)
                    for name in CALIBRATED_DRAFTERS if name in built}
    manifest = install(work, target, built, out, calibrations)
    _log(f"installed into {out}")
    return {"out": str(out), "work": str(work), "manifest": to_dict(manifest)}
