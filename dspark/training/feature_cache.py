"""Target features for drafter training (docs/design.md §2.1, §2.6): on disk (the "target cache") or online.

Per conversation sample (tokenised by `prompts.tokenize_sample`, right-truncated to max_length):
  input_ids     int32 [S]
  loss_mask     uint8 [S]        1 on response tokens
  features      dtype [S, L·H]   raw outputs of the L target layers (residual stream, not normalised)
  final_hidden  dtype [S, H]     the target's final post-norm hidden state (lm_head of it = target logits)

Disk layout of a cache folder (everything little-endian, read back with numpy memmap, no pickle):
  shard-NNNNN.tokens.bin    int32   [n, ]        the tokens of the shard's samples, back to back
  shard-NNNNN.mask.bin      uint8   [n, ]
  shard-NNNNN.features.bin  dtype   [n, L·H]     (bfloat16 is stored as its raw 16-bit patterns)
  shard-NNNNN.final.bin     dtype   [n, H]
  index.bin                 int64   [N, 4]       per sample: shard, first token row in the shard, S, input line index
  sample_ids.json           [N]                  the input's sample id of every cached sample
  manifest.json             format version, counts, shards and their byte sizes, dtype, hidden_size,
                            target_layer_ids, target identity, max_length, chat template, "complete": true

Size: bytes per token = (L + 1)·H·b + 4 + 1 with b = 2 (bf16/fp16) or 4 (fp32); the shard files hold
exactly that × the number of tokens, plus index.bin (32 B/sample), sample_ids.json and manifest.json.
Qwen3-4B, 5 layers, bf16: 6·2560·2 + 5 = 30 725 B/token (DeepSpec: 30 726 with its unused attention mask).

The size is computed exactly from the tokenised data and printed before anything is written; the build
refuses (`DiskSpaceError`) when the output file system has less free space. The whole cache is written into
a temporary sibling folder (`.NAME.tmp-*`) that is renamed to NAME only once every file, the index and
finally the manifest are on disk: an interrupted run leaves no valid-looking cache. There is no partial
resume — a new run restarts from the beginning (delete the leftover `.NAME.tmp-*` folder of a killed run).

Online alternative: `compute_features(runner, token_ids, layer_ids)` returns the same tensors from a frozen
target in the training process, so training can run without any cache (docs/design.md §2.6).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dspark.errors import CheckpointError, ConfigError
from dspark import files
from dspark.files import default_mode
from dspark.models.checkpoint import save_folder_atomically
from dspark.models.fingerprint import model_fingerprint
from dspark.models.target_runner import TargetRunner
from dspark.data.chat import TokenizedSample, chat_template_info, tokenize_sample
from dspark.data.samples import Sample

FORMAT = "dspark-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.bin"
SAMPLE_IDS = "sample_ids.json"
INDEX_COLUMNS = ("shard", "token_offset", "num_tokens", "source_index")
DEFAULT_MAX_SHARD_BYTES = 64 * 2**30
DEFAULT_BATCH_TOKENS = 8192
MANIFEST_ALLOWANCE = 4096  # bytes reserved for manifest.json in the estimate (plus 512 per shard)

# name → (torch dtype, numpy dtype of the stored bits, bytes per element)
CACHE_DTYPES: dict[str, tuple[torch.dtype, np.dtype, int]] = {
    "bfloat16": (torch.bfloat16, np.dtype("<i2"), 2),
    "float16": (torch.float16, np.dtype("<f2"), 2),
    "float32": (torch.float32, np.dtype("<f4"), 4),
}
TOKEN_DTYPE, MASK_DTYPE = np.dtype("<i4"), np.dtype("u1")


class DiskSpaceError(ConfigError):
    """The output file system cannot hold the cache."""


# -- sizes -------------------------------------------------------------------------


def _dtype_entry(dtype: str) -> tuple[torch.dtype, np.dtype, int]:
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype {dtype!r} is not supported; choose one of {', '.join(CACHE_DTYPES)}")
    return CACHE_DTYPES[dtype]


def check_layer_ids(layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """Target layer ids as a list: at least one, no duplicates, each in [-1, num_layers) (-1 = embedding output)."""
    layers = [int(i) for i in layer_ids]
    if not layers:
        raise ConfigError("at least one target layer id is needed")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"duplicate target layer ids in {layers}")
    for layer in layers:
        if not -1 <= layer < num_layers:
            raise ConfigError(f"target layer id {layer} out of range [-1, {num_layers - 1}] for this {num_layers}-layer target")
    return layers


def bytes_per_token(num_layers: int, hidden_size: int, dtype: str) -> int:
    """(L + 1)·H·b + 4 (int32 token) + 1 (uint8 mask) bytes for L feature layers plus the final hidden state."""
    return (num_layers + 1) * hidden_size * _dtype_entry(dtype)[2] + TOKEN_DTYPE.itemsize + MASK_DTYPE.itemsize


def _shard_plan(token_counts: Sequence[int], per_token: int, max_shard_bytes: int) -> list[int]:
    """Shard of every sample: a new shard starts when the next sample would exceed max_shard_bytes
    (a sample larger than that gets a shard of its own)."""
    plan, shard, used = [], 0, 0
    for n in token_counts:
        size = n * per_token
        if used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        plan.append(shard)
        used += size
    return plan


@dataclass
class CacheSizeEstimate:
    num_samples: int
    num_tokens: int
    bytes_per_token: int
    data_bytes: int  # shard files, exact
    index_bytes: int  # index.bin + sample_ids.json, exact
    num_shards: int
    manifest_allowance: int

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.index_bytes + self.manifest_allowance

    def describe(self) -> str:
        return (
            f"{self.num_samples} samples, {self.num_tokens} tokens × {self.bytes_per_token} B/token = "
            f"{_human(self.data_bytes)} in {self.num_shards} shard(s), {_human(self.total_bytes)} with index and manifest"
        )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _sample_ids_json(ids: Sequence[str | int]) -> bytes:
    return json.dumps(list(ids), ensure_ascii=False).encode("utf-8")


def estimate_cache_size(
    token_counts: Sequence[int], sample_ids: Sequence[str | int], *, num_layers: int, hidden_size: int,
    dtype: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> CacheSizeEstimate:
    """The exact size of a cache of samples with these token counts (manifest.json: an allowance)."""
    per_token = bytes_per_token(num_layers, hidden_size, dtype)
    plan = _shard_plan(token_counts, per_token, max_shard_bytes)
    num_shards = plan[-1] + 1 if plan else 0
    tokens = int(sum(token_counts))
    return CacheSizeEstimate(
        num_samples=len(token_counts), num_tokens=tokens, bytes_per_token=per_token, data_bytes=tokens * per_token,
        index_bytes=len(token_counts) * 8 * len(INDEX_COLUMNS) + len(_sample_ids_json(sample_ids)),
        num_shards=num_shards, manifest_allowance=MANIFEST_ALLOWANCE + 512 * num_shards,
    )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(output: str | Path, estimate: CacheSizeEstimate) -> int:
    """Free bytes on the file system that will hold `output`; `DiskSpaceError` if the cache does not fit."""
    output = Path(output)
    where = _existing_ancestor(output.parent)
    free = shutil.disk_usage(where).free
    if free < estimate.total_bytes:
        raise DiskSpaceError(
            f"the cache needs {_human(estimate.total_bytes)} ({estimate.describe()}), but {where} has only "
            f"{_human(free)} free; free space, cache fewer layers/tokens (--max-length), use a smaller --dtype, "
            "or train with online features instead"
        )
    return free


# -- online features -----------------------------------------------------------------------------------


@dataclass
class TargetFeatures:
    features: torch.Tensor  # [S, L·H] raw outputs of the requested layers, runner dtype
    final_hidden: torch.Tensor  # [S, H] final post-norm hidden state, runner dtype


def compute_features_batch(
    runner: TargetRunner, token_ids: Sequence[Sequence[int] | torch.Tensor], layer_ids: Sequence[int]
) -> list[TargetFeatures]:
    """One ragged forward of whole sequences through a fresh KV cache entry each → per-sequence features.

    The result for a sequence does not depend on the others in the batch (up to floating-point
    reassociation of the padded attention).
    """
    layer_ids = tuple(check_layer_ids(layer_ids, runner.config.num_layers))
    handles = [runner.new_sequence() for _ in token_ids]
    try:
        out = runner.forward(handles, list(token_ids), all_logits=False, feature_layer_ids=layer_ids,
                             return_final_hidden=True)
    finally:
        for handle in handles:
            runner.free_sequence(handle)
    return [TargetFeatures(f, h) for f, h in zip(out.split(out.features), out.split(out.final_hidden))]


def compute_features(runner: TargetRunner, token_ids: Sequence[int] | torch.Tensor, layer_ids: Sequence[int]) -> TargetFeatures:
    """Features [S, L·H] and final hidden state [S, H] of one sequence, computed on the fly (no cache)."""
    return compute_features_batch(runner, [token_ids], layer_ids)[0]


# -- building ------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Tokenised samples ready to cache, with what was dropped and why."""

    samples: list[tuple[Sample, TokenizedSample]]
    max_length: int | None
    min_loss_tokens: int
    dropped_no_response: int = 0  # samples without an assistant message
    dropped_few_loss_tokens: int = 0  # fewer than min_loss_tokens supervised tokens after truncation

    @property
    def token_counts(self) -> list[int]:
        return [t.num_tokens for _, t in self.samples]


def prepare_cache_samples(
    tokenizer, samples: Sequence[Sample], *, max_length: int | None, min_loss_tokens: int = 1,
    template_kwargs: dict | None = None, progress: bool = False,
) -> PreparedData:
    """Tokenise every sample (the exact token counts are what the size estimate needs)."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be an integer ≥ 1, got {max_length!r}")
    if isinstance(min_loss_tokens, bool) or not isinstance(min_loss_tokens, int) or min_loss_tokens < 0:
        raise ConfigError(f"min_loss_tokens must be an integer ≥ 0, got {min_loss_tokens!r}")
    from tqdm import tqdm

    data = PreparedData([], max_length, min_loss_tokens)
    for sample in tqdm(samples, desc="tokenise", unit="sample", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        if not any(m["role"] == "assistant" for m in sample.messages):
            data.dropped_no_response += 1
            continue
        tokenized = tokenize_sample(tokenizer, sample, max_length=max_length, template_kwargs=template_kwargs)
        if tokenized.num_loss_tokens < min_loss_tokens or tokenized.num_tokens == 0:
            data.dropped_few_loss_tokens += 1
            continue
        data.samples.append((sample, tokenized))
    if not data.samples:
        raise ConfigError(
            f"none of the {len(samples)} samples has an assistant response with ≥ {min_loss_tokens} supervised "
            f"token(s) ({data.dropped_no_response} without any assistant turn); regenerate responses first "
            "(`dspark data regenerate`)"
        )
    return data


def stale_temp_folders(output: Path) -> list[Path]:
    parent = output.absolute().parent
    return sorted(parent.glob(f".{output.name}.tmp-*")) if parent.is_dir() else []


def check_output_folder(output: str | Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty folder unless `overwrite` (and anything `dspark.files`
    refuses for an output folder)."""
    output = files.check_output_folder(output, "--output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} already exists and is not empty; pass --overwrite to replace it")


class _ShardWriter:
    def __init__(self, folder: Path, shard: int):
        self.name = f"shard-{shard:05d}"
        self.files = {kind: (folder / f"{self.name}.{kind}.bin").open("wb") for kind in ("tokens", "mask", "features", "final")}
        self.num_tokens = 0
        self.num_bytes = 0

    def write(self, arrays: dict[str, np.ndarray]) -> int:
        """Append one sample; returns its first token row in this shard."""
        offset = self.num_tokens
        for kind, array in arrays.items():
            data = np.ascontiguousarray(array)
            self.files[kind].write(data.data)
            self.num_bytes += data.nbytes
        self.num_tokens += len(arrays["tokens"])
        return offset

    def abort(self) -> None:
        for f in self.files.values():
            f.close()

    def close(self) -> dict:
        sizes = {}
        for kind, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[kind] = f.tell()
            f.close()
        return {"name": self.name, "num_tokens": self.num_tokens,
                "files": {kind: {"file": f"{self.name}.{kind}.bin", "bytes": size} for kind, size in sizes.items()}}


def _to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    torch_dtype, np_dtype, _ = CACHE_DTYPES[dtype]
    t = tensor.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(np_dtype, copy=False)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _batches(samples: list, batch_tokens: int) -> list[list]:
    """Consecutive groups whose padded size (count × longest) stays within batch_tokens."""
    groups, current, longest = [], [], 0
    for item in samples:
        n = item[1].num_tokens
        if current and max(longest, n) * (len(current) + 1) > batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def write_feature_cache(
    runner: TargetRunner,
    data: PreparedData,
    output: str | Path,
    *,
    layer_ids: Sequence[int],
    target_identity: dict,
    chat_template: dict,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    template_kwargs: dict | None = None,
    source: str | None = None,
    progress: bool = False,
) -> dict:
    """Run the target over `data` and write the cache folder atomically; returns the manifest."""
    _dtype_entry(dtype)
    layer_ids = check_layer_ids(layer_ids, runner.config.num_layers)
    hidden = runner.config.hidden_size
    per_token = bytes_per_token(len(layer_ids), hidden, dtype)
    plan = _shard_plan(data.token_counts, per_token, max_shard_bytes)
    written: dict = {}
    from tqdm import tqdm

    def write(tmp: Path) -> None:
        tmp.chmod(default_mode(0o777))  # mkdtemp creates 0700; a cache is usually shared
        index = np.zeros((len(data.samples), len(INDEX_COLUMNS)), dtype="<i8")
        shards: list[dict] = []
        writer: _ShardWriter | None = None
        row = 0
        bar = tqdm(total=sum(data.token_counts), desc="cache", unit="tok", unit_scale=True, file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for group in _batches(data.samples, batch_tokens):
                feats = compute_features_batch(runner, [t.input_ids for _, t in group], layer_ids)
                for (sample, tokenized), feat in zip(group, feats):
                    if writer is None or plan[row] != len(shards):
                        if writer is not None:
                            shards.append(writer.close())
                        writer = _ShardWriter(tmp, plan[row])
                    offset = writer.write({
                        "tokens": tokenized.input_ids.numpy().astype(TOKEN_DTYPE),
                        "mask": tokenized.loss_mask.numpy().astype(MASK_DTYPE),
                        "features": _to_storage(feat.features, dtype),
                        "final": _to_storage(feat.final_hidden, dtype),
                    })
                    index[row] = (plan[row], offset, tokenized.num_tokens, sample.index)
                    row += 1
                bar.update(sum(t.num_tokens for _, t in group))
            if writer is not None:
                shards.append(writer.close())
                writer = None
        finally:
            bar.close()
            if writer is not None:
                writer.abort()
        _write_durably(tmp / INDEX, index.tobytes())
        _write_durably(tmp / SAMPLE_IDS, _sample_ids_json([s.id for s, _ in data.samples]))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_samples": len(data.samples),
            "num_tokens": int(sum(data.token_counts)),
            "dtype": dtype,
            "hidden_size": hidden,
            "target_layer_ids": layer_ids,
            "feature_dim": len(layer_ids) * hidden,
            "bytes_per_token": per_token,
            "target": target_identity,
            "max_length": data.max_length,
            "min_loss_tokens": data.min_loss_tokens,
            "dropped": {"no_response": data.dropped_no_response, "few_loss_tokens": data.dropped_few_loss_tokens},
            "chat_template": chat_template,
            "template_kwargs": template_kwargs or {},
            "source": source,
            "index": {"file": INDEX, "dtype": "<i8", "columns": list(INDEX_COLUMNS)},
            "sample_ids": SAMPLE_IDS,
            "shards": shards,
            "created_unix": time.time(),
            "complete": True,
        }
        part = tmp / (MANIFEST + ".part")
        _write_durably(part, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(part, tmp / MANIFEST)  # the completion marker: written last
        written.update(manifest)

    save_folder_atomically(Path(output), write)
    return written


def build_feature_cache(
    runner: TargetRunner,
    tokenizer,
    samples: Sequence[Sample],
    output: str | Path,
    *,
    layer_ids: Sequence[int],
    target_identity: dict,
    dtype: str = "bfloat16",
    max_length: int | None = None,
    min_loss_tokens: int = 1,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    template_kwargs: dict | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> dict:
    """Tokenise, estimate (printed via `log`), check free disk space, then write. Returns the manifest.

    max_length: right truncation in tokens (None: the target's context length).
    """
    _dtype_entry(dtype)
    layer_ids = check_layer_ids(layer_ids, runner.config.num_layers)
    check_output_folder(output, overwrite=overwrite)
    max_length = resolve_max_length(max_length, runner.max_context)
    data = prepare_cache_samples(tokenizer, samples, max_length=max_length, min_loss_tokens=min_loss_tokens,
                                 template_kwargs=template_kwargs, progress=progress)
    estimate = estimate_cache_size(data.token_counts, [s.id for s, _ in data.samples], num_layers=len(layer_ids),
                                   hidden_size=runner.config.hidden_size, dtype=dtype, max_shard_bytes=max_shard_bytes)
    log(f"feature cache: {estimate.describe()}")
    for stale in stale_temp_folders(Path(output)):
        log(f"feature cache: warning: {stale} is left over from an interrupted run; delete it to free its space")
    check_disk_space(output, estimate)
    return write_feature_cache(
        runner, data, output, layer_ids=layer_ids, target_identity=target_identity,
        chat_template=chat_template_info(tokenizer), dtype=dtype, max_shard_bytes=max_shard_bytes,
        batch_tokens=batch_tokens, template_kwargs=template_kwargs, source=source, progress=progress,
    )


def resolve_max_length(max_length: int | None, max_context: int) -> int:
    if max_length is None:
        return max_context
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be an integer ≥ 1, got {max_length!r}")
    if max_length > max_context:
        raise ConfigError(f"max_length {max_length} exceeds the target's context of {max_context} tokens")
    return max_length


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class CachedSample:
    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] bool
    features: torch.Tensor  # [S, L·H] cache dtype
    final_hidden: torch.Tensor  # [S, H] cache dtype


@dataclass
class _Shard:
    name: str
    num_tokens: int
    paths: dict[str, Path]
    maps: dict[str, np.memmap] = field(default_factory=dict)


class FeatureCache:
    """Read-only view of a cache folder: `cache[i]` → `CachedSample` (tensors copied out of the memmaps).

    Opening checks the manifest (present, complete, this format version), the index and every shard
    file's size against the index, raising `CheckpointError` naming the file at fault.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(
                f"{self.path}: no {MANIFEST}; not a feature cache, or one whose writing was interrupted "
                "(a cache gets its manifest only when complete)"
            )
        try:
            m = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({exc})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path}: not a dspark feature cache manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{manifest_path}: format version {m.get('format_version')!r}; this dspark reads version {FORMAT_VERSION}"
            )
        if m.get("complete") is not True:
            raise CheckpointError(f"{manifest_path}: the cache is not marked complete")
        try:
            self.dtype = m["dtype"]
            self.torch_dtype, self.np_dtype, _ = _dtype_entry(self.dtype)
            self.hidden_size = int(m["hidden_size"])
            self.target_layer_ids = [int(i) for i in m["target_layer_ids"]]
            self.num_samples = int(m["num_samples"])
            self.shards = [
                _Shard(s["name"], int(s["num_tokens"]), {k: self.path / v["file"] for k, v in s["files"].items()})
                for s in m["shards"]
            ]
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        self.manifest = m
        self.feature_dim = len(self.target_layer_ids) * self.hidden_size
        self.index = self._read_index()
        self.check_files()

    def _read_index(self) -> np.ndarray:
        path = self.path / INDEX
        expected = self.num_samples * 8 * len(INDEX_COLUMNS)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, expected {expected} for {self.num_samples} samples — truncated or corrupted"
            )
        index = np.fromfile(path, dtype="<i8").reshape(self.num_samples, len(INDEX_COLUMNS))
        shard, offset, length = index[:, 0], index[:, 1], index[:, 2]
        if len(index) and (shard.min() < 0 or shard.max() >= len(self.shards) or offset.min() < 0 or length.min() < 1):
            raise CheckpointError(f"{path}: entries out of range — corrupted index")
        limits = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        if len(index) and np.any(offset + length > limits[shard]):
            raise CheckpointError(f"{path}: a sample extends past the end of its shard — corrupted index")
        return index

    def _row_bytes(self) -> dict[str, int]:
        b = self.np_dtype.itemsize
        return {"tokens": TOKEN_DTYPE.itemsize, "mask": MASK_DTYPE.itemsize,
                "features": self.feature_dim * b, "final": self.hidden_size * b}

    def check_files(self) -> None:
        """Every shard file exists with exactly num_tokens × bytes-per-row bytes (`CheckpointError` if not)."""
        rows = self._row_bytes()
        for shard in self.shards:
            for kind, per_row in rows.items():
                path = shard.paths.get(kind)
                if path is None:
                    raise CheckpointError(f"{self.path / MANIFEST}: shard {shard.name} lists no {kind} file")
                if not path.is_file():
                    raise CheckpointError(f"{path}: missing shard file")
                size, expected = path.stat().st_size, shard.num_tokens * per_row
                if size != expected:
                    raise CheckpointError(
                        f"{path}: {size} bytes, but the index expects {expected} ({shard.num_tokens} tokens × {per_row} B) "
                        "— truncated or corrupted shard; rebuild the cache"
                    )

    def __len__(self) -> int:
        return self.num_samples

    def _map(self, shard: _Shard, kind: str) -> np.memmap:
        if kind not in shard.maps:
            cols = {"tokens": None, "mask": None, "features": self.feature_dim, "final": self.hidden_size}[kind]
            dtype = {"tokens": TOKEN_DTYPE, "mask": MASK_DTYPE}.get(kind, self.np_dtype)
            shape = (shard.num_tokens,) if cols is None else (shard.num_tokens, cols)
            shard.maps[kind] = np.memmap(shard.paths[kind], dtype=dtype, mode="r", shape=shape)
        return shard.maps[kind]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(array))
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t

    def _rows(self, i: int) -> tuple[_Shard, slice]:
        """Sample i's shard and token rows in it."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"cache indices are integers, got {type(i).__name__}")
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a cache of {self.num_samples}")
        shard_id, start, length, _ = (int(v) for v in self.index[i])
        return self.shards[shard_id], slice(start, start + length)

    def loss_mask(self, i: int) -> torch.Tensor:
        """Sample i's loss mask [S] bool alone (no features read)."""
        shard, rows = self._rows(i)
        return torch.from_numpy(np.array(self._map(shard, "mask")[rows])).bool()

    def __getitem__(self, i: int) -> CachedSample:
        shard, rows = self._rows(i)
        return CachedSample(
            input_ids=torch.from_numpy(np.array(self._map(shard, "tokens")[rows])).long(),
            loss_mask=self.loss_mask(i),
            features=self._tensor(self._map(shard, "features")[rows]),
            final_hidden=self._tensor(self._map(shard, "final")[rows]),
        )

    def sample_ids(self) -> list[str | int]:
        """The input-file id of every cached sample, in cache order."""
        return json.loads((self.path / SAMPLE_IDS).read_text())

    def validate(
        self,
        target_layer_ids: Sequence[int] | None = None,
        hidden_size: int | None = None,
        target_identity: dict | str | Path | None = None,
    ) -> None:
        """Check the cache fits a training run: same target layers, hidden size and target (config and
        weight-file hashes; a folder path is hashed with `model_fingerprint`), and intact shard files.
        Mismatches raise `ConfigError` (layers, hidden size) or `CheckpointError` (target, files)."""
        if target_layer_ids is not None and [int(i) for i in target_layer_ids] != self.target_layer_ids:
            raise ConfigError(
                f"{self.path}: cached features are of target layers {self.target_layer_ids}, the drafter needs "
                f"{list(target_layer_ids)}; rebuild the cache with --layers {','.join(str(i) for i in target_layer_ids)}"
            )
        if hidden_size is not None and int(hidden_size) != self.hidden_size:
            raise ConfigError(f"{self.path}: cached hidden size is {self.hidden_size}, the target's is {hidden_size}")
        if target_identity is not None:
            wanted = target_identity if isinstance(target_identity, dict) else model_fingerprint(target_identity)
            cached = self.manifest.get("target") or {}
            for key in ("config_sha256", "weights_sha256"):
                if cached.get(key) != wanted.get(key):
                    raise CheckpointError(
                        f"{self.path}: built from target {cached.get('name')!r}, which differs from "
                        f"{wanted.get('name')!r} ({key.split('_')[0]} hash {str(cached.get(key))[:12]} ≠ "
                        f"{str(wanted.get(key))[:12]}); rebuild the cache for this target"
                    )
        self.check_files()
