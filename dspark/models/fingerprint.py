"""The fingerprint of a model folder: which target (or drafter) a feature cache, a regenerated data set, a
calibration file or an SPS profile was made with, checked again before one is reused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dspark.errors import CheckpointError

SAMPLE_BYTES = 2**20  # bytes hashed at each end of every weight file


def model_fingerprint(folder: str | Path) -> dict[str, str]:
    """Identify a model folder without reading all of its weights.

    {"name": folder name (informative only), "config_sha256": sha256 of config.json, "weights_sha256":
    sha256 over every *.safetensors file (sorted by name) of its name, size, first and last MiB — the
    safetensors header and the first and last tensors' bytes, so a fine-tune of the same architecture
    (same names and sizes) is told apart too}. Two folders match when both hashes match.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: not found; a model folder needs config.json")
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(json.dumps([path.name, size]).encode())
        with path.open("rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(0, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return {
        "name": folder.resolve().name,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
    }
