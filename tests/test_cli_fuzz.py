"""A fuzz suite of the command line (hypothesis, derandomised so CI runs the same cases): sampling flags,
model and drafter config fields, training config fields, JSONL prompt files, traces and SPS profile files.

Every case asserts what the README promises for bad input: the exit status is 0 or 2, never a traceback
(an exception escaping `dspark.cli.main` fails the test), the last stderr line of a refusal names the
culprit (the flag, the field, or the file), and a refused run creates or changes no output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.cli import main
from dspark.models.random_init import build_random_model

from drafters_for_tests import save_dspark_folder

def fuzz(examples: int) -> settings:
    """Derandomised (the same cases on every run and in CI), no deadline (model loads vary)."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def run(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `dspark argv` in this process; argparse refusals count as exits."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def fresh_folder(tmp_path_factory, name: str) -> Path:
    """An empty folder `name` under pytest's base temp, emptied again for each hypothesis example."""
    root = tmp_path_factory.getbasetemp() / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return root


def check_outcome(code: int, err: str, culprits: list[str]) -> None:
    """Exit 0 or 2, never a traceback; a refusal's last line names one of `culprits`."""
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert "error" in last, last
        assert any(c in last for c in culprits), (culprits, last)


def json_paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (dict keys and list indices), parents before children."""
    paths = []
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return paths
    for key, value in items:
        paths.append(prefix + (key,))
        paths.extend(json_paths(value, prefix + (key,)))
    return paths


def mutate(doc, path: tuple, value, delete: bool):
    """A copy of `doc` with the value at `path` replaced by `value` (or its key deleted)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@st.composite
def mutations(draw, doc, max_paths: int | None = None):
    paths = json_paths(doc)
    if max_paths is not None:
        paths = paths[:max_paths]
    path = draw(st.sampled_from(paths))
    delete = draw(st.booleans())
    value = draw(JSON_VALUES)
    return path, value, delete


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("fuzz") / "tiny", "tiny-qwen3", seed=3, init_std=0.08,
                              max_position_embeddings=64)


# -- sampling flags -----------------------------------------------------------------------------------------

FLAG_VALUES = {
    "--temperature": ["0", "0.7", "1", "-1", "nan", "inf", "1e400", "abc", ""],
    "--top-k": ["0", "3", "1000000", "-2", "1.5", "x"],
    "--top-p": ["1", "0.5", "0", "1.5", "-0.1", "nan", "p"],
    "--max-new-tokens": ["1", "4", "0", "-3", "100000", "2.5"],
    "--seed": ["0", "7", str(2**63 - 1), str(2**63), "-1", "s"],
    "--num-draft-tokens": ["1", "3", "0", "-1", "99", "q"],
}
FLAG_NAMES = {  # the words a refusal of each flag may use
    "--temperature": ["temperature"], "--top-k": ["top_k", "top-k"], "--top-p": ["top_p", "top-p"],
    "--max-new-tokens": ["max-new-tokens", "max_new_tokens", "context"], "--seed": ["--seed"],
    "--num-draft-tokens": ["num_draft_tokens", "num-draft-tokens", "block size"],
}


def flag_is_valid(flag: str, text: str) -> bool:
    if flag in ("--temperature", "--top-p"):
        try:
            value = float(text)
        except ValueError:
            return False
        if flag == "--temperature":
            return math.isfinite(value) and value >= 0
        return math.isfinite(value) and 0 < value <= 1
    try:
        value = int(text)
    except ValueError:
        return False
    if flag == "--top-k":
        return value >= 0
    if flag == "--max-new-tokens":
        return 1 <= value <= 16  # the prompt takes a few of the 64 positions
    if flag == "--seed":
        return 0 <= value < 2**63
    return value >= 1  # --num-draft-tokens: the n-gram drafter has no trained block size


@fuzz(40)
@given(st.fixed_dictionaries({}, optional={flag: st.sampled_from(values) for flag, values in FLAG_VALUES.items()}))
def test_sampling_flags(model_dir, flags):
    argv = ["generate", "--model", str(model_dir), "--prompt", "def f(x):", "--drafter", "ngram", "--threads", "1",
            "--max-new-tokens", "4", "--json"]
    for flag, value in flags.items():
        argv.append(f"{flag}={value}")
    code, out, err = run(argv)
    invalid = [flag for flag, value in flags.items() if not flag_is_valid(flag, value)]
    check_outcome(code, err, [name for flag in invalid for name in FLAG_NAMES[flag]] or ["<none>"])
    assert (code == 0) == (not invalid), (flags, err)
    if code == 0:
        result = json.loads(out)
        assert len(result["token_ids"]) <= int(flags.get("--max-new-tokens", 4))


# -- model and drafter config.json fields ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafter_dir(model_dir, tmp_path_factory):
    return save_dspark_folder(model_dir, tmp_path_factory.mktemp("fuzzdrafter") / "dspark")


def copy_with_config(folder: Path, dest: Path, config) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@fuzz(60)
@given(st.data())
def test_target_config_fields(model_dir, tmp_path_factory, data):
    base = json.loads((model_dir / "config.json").read_text())
    path, value, delete = data.draw(mutations(base))
    folder = copy_with_config(model_dir, tmp_path_factory.getbasetemp() / "fuzz-target", mutate(base, path, value, delete))
    code, _, err = run(["generate", "--model", str(folder), "--prompt", "x", "--max-new-tokens", "2", "--drafter", "none",
                        "--threads", "1"])
    check_outcome(code, err, [str(path[0]), str(folder)])


@fuzz(60)
@given(st.data())
def test_drafter_config_fields(model_dir, drafter_dir, tmp_path_factory, data):
    base = json.loads((drafter_dir / "config.json").read_text())
    path, value, delete = data.draw(mutations(base))
    folder = copy_with_config(drafter_dir, tmp_path_factory.getbasetemp() / "fuzz-drafter", mutate(base, path, value, delete))
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2", "--drafter",
                        str(folder), "--threads", "1"])
    check_outcome(code, err, [str(path[0]), str(folder)])


# -- training config fields ------------------------------------------------------------------------------------

TRAIN_FIELDS = {
    "model.drafter": st.sampled_from(["dspark", "dflash", "eagle3", "mtp", "nope", 3]),
    "model.draft_layers": st.sampled_from([1, 0, -1, 1.5, "two", None]),
    "model.block_size": st.sampled_from([2, 0, -4, True, "x"]),
    "model.markov_rank": st.sampled_from([0, 4, -1, 2.5]),
    "model.target_layer_ids": st.sampled_from([[0, 1], [], [0, 99], [-5], "0,1", [0.5]]),
    "model.mask_token_id": st.sampled_from([None, 5, -1, 10**9, "m"]),
    "data.max_length": st.sampled_from([32, 1, 0, -1, "long"]),
    "data.num_anchors": st.sampled_from([4, 0, -2]),
    "optim.lr": st.sampled_from([1e-3, 0, -1, "1e-3", float("nan"), float("inf"), "fast"]),
    "optim.betas": st.sampled_from([[0.9, 0.95], [0.9], [1.5, 0.9], "beta", [None, 0.9]]),
    "optim.warmup_ratio": st.sampled_from([0.0, 0.5, 1.0, -0.1]),
    "optim.grad_clip": st.sampled_from([1.0, 0, -1]),
    "train.batch_size": st.sampled_from([1, 2, 0, -1, 1.5]),
    "train.micro_batch_size": st.sampled_from([1, 0]),
    "train.max_steps": st.sampled_from([1, 0, -1, None, "1"]),
    "train.checkpoint_every": st.sampled_from([1, 0]),
    "train.keep_last": st.sampled_from([None, 1, 0, -2]),
    "train.dtype": st.sampled_from(["float32", "float64", "int8", 5]),
    "train.parallel": st.sampled_from(["ddp", "fsdp", "mpi"]),
    "train.device": st.sampled_from(["cpu", "auto", "tpu", "cuda:99", 0]),
    "train.seed": st.sampled_from([0, -1, 2**70, "s"]),
    "train.unknown_key": st.just(1),
    "bogus_section.key": st.just(1),
}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzdata") / "train.jsonl"
    rows = [{"input_ids": [(7 * i + j) % 200 + 3 for j in range(24)], "loss_mask": [0] * 6 + [1] * 18} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@fuzz(25)
@given(st.dictionaries(st.sampled_from(sorted(TRAIN_FIELDS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda keys: st.fixed_dictionaries({k: TRAIN_FIELDS[k] for k in keys})))
def test_training_config_fields(model_dir, train_data, tmp_path_factory, fields):
    out = tmp_path_factory.getbasetemp() / "fuzz-train" / f"run-{abs(hash(json.dumps(fields, default=str))) % 10**9}"
    shutil.rmtree(out, ignore_errors=True)
    config = {"preset": "dspark", "model": {"target": str(model_dir), "draft_layers": 1, "block_size": 3,
                                            "markov_rank": 4, "target_layer_ids": [0, 1]},
              "data": {"train": str(train_data), "max_length": 32, "num_anchors": 4},
              "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 2, "micro_batch_size": 1,
                        "device": "cpu", "progress": False, "checkpoint_every": 1}}
    for dotted, value in fields.items():
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = value
    config_path = out.parent / "config.json.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))  # JSON is YAML
    code, _, err = run(["train", "--config", str(config_path)])
    check_outcome(code, err, [d.split(".")[-1] for d in fields] + [d.split(".")[0] for d in fields]
                  + [str(model_dir), str(train_data)])
    if code == 2:
        assert not any(out.glob("step_*")), "a refused run wrote a checkpoint"


# -- JSONL prompt files ---------------------------------------------------------------------------------------

VALID_PROMPT_LINE = st.builds(lambda t: json.dumps({"turns": [t]}), st.text(min_size=1, max_size=20))
PROMPT_LINES = st.one_of(VALID_PROMPT_LINE, st.one_of(
    st.builds(lambda v: json.dumps({"turns": v}), JSON_VALUES),
    st.builds(lambda v: json.dumps({"conversations": v}), JSON_VALUES),
    st.builds(json.dumps, JSON_VALUES),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
    st.just("{not json"), st.just(""), st.just('{"turns": ["\\ud800"]}'),
))


@fuzz(30)
@given(st.lists(PROMPT_LINES, min_size=1, max_size=4), st.sampled_from([False, False, False, True]))
def test_prompt_files(model_dir, tmp_path_factory, lines, invalid_utf8):
    root = fresh_folder(tmp_path_factory, "fuzz-prompts")
    data = root / "prompts.jsonl"
    raw = "\n".join(lines).encode("utf-8", "surrogatepass") + (b"\n\xff\xfe\n" if invalid_utf8 else b"\n")
    data.write_bytes(raw)
    out = root / "out"
    code, _, err = run(["eval", "--target", str(model_dir), "--drafter", "ngram", "--datasets", str(data),
                        "--max-new-tokens", "2", "--limit", "3", "--no-progress", "--out", str(out)])
    check_outcome(code, err, [str(data)])
    if code == 2:
        assert not out.exists(), "a refused evaluation wrote its output folder"
    else:
        assert (out / "eval.json").is_file()


# -- traces and SPS profile files ---------------------------------------------------------------------------


def sample_traces() -> dict:
    rounds = 12
    return {"dspark": {
        "drafter": "dspark", "block_size": 3, "temperature": 1.0, "has_confidences": True,
        "confidence_temperatures": [1.0, 1.0, 1.0], "confidence_biases": [0.0, 0.0, 0.0],
        "datasets": {"gsm8k": {
            "domain": "math", "confidences": [[0.9, 0.6, 0.3]] * rounds, "drafted": [3] * rounds,
            "verified": [3] * rounds, "accepted": [i % 4 for i in range(rounds)],
            "emitted": [i % 4 + 1 for i in range(rounds)], "sample": [i // 4 for i in range(rounds)],
        }},
    }}


PROFILE = {"device": "fuzz", "draft_layers": 1,
           "verify_ms": {"1x1": 5.0, "1x2": 5.2, "1x4": 5.5, "4x1": 6.0, "4x2": 6.5, "4x4": 7.5},
           "draft_ms": {"1": 1.0, "4": 1.4}}


@pytest.mark.filterwarnings("ignore:Glyph")  # fuzzed labels hold characters the plot font lacks
@fuzz(50)
@given(st.data())
def test_traces_files(tmp_path_factory, data):
    root = fresh_folder(tmp_path_factory, "fuzz-traces")
    path, value, delete = data.draw(mutations(sample_traces(), max_paths=24))
    traces = root / "traces.json"
    traces.write_text(json.dumps(mutate(sample_traces(), path, value, delete)))
    out = root / "sweep"
    code, _, err = run(["sweep", "--traces", str(traces), "--thresholds", "0.2,0.8", "--out", str(out)])
    check_outcome(code, err, [str(traces)])
    assert out.exists() == (code == 0)


@pytest.mark.filterwarnings("ignore:Glyph")  # fuzzed labels hold characters the plot font lacks
@fuzz(50)
@given(st.data())
def test_profile_files(tmp_path_factory, data):
    root = fresh_folder(tmp_path_factory, "fuzz-profile")
    traces = root / "traces.json"
    traces.write_text(json.dumps(sample_traces()))
    path, value, delete = data.draw(mutations(PROFILE))
    profile = root / "profile.json"
    profile.write_text(json.dumps(mutate(PROFILE, path, value, delete)))
    out = root / "sim"
    code, _, err = run(["simulate", "--traces", str(traces), "--profile", str(profile), "--concurrency", "1,4",
                        "--steps", "3", "--min-rounds", "0", "--policies", "plain,fixed-2,causal-greedy", "--out", str(out)])
    check_outcome(code, err, [str(profile)])
    assert out.exists() == (code == 0)
