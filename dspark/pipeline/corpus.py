"""The built-in model's training corpus: Python standard-library source + the Python documentation.

Sources, both available on any Debian-bookworm machine of this kind without upgrading its Python:
  * the standard library of the running interpreter (`sysconfig` "stdlib"; test suites, idlelib
    tests and site-packages excluded), and
  * the reStructuredText sources of the Python documentation, Debian package `python3.11-doc`, pinned
    to DOCS_PACKAGE_VERSION. The package is fetched with `apt-get download` and unpacked with
    `dpkg-deb -x` into a cache folder — never installed, because installing it would upgrade the
    system `python3.11` to the same Debian revision. An installed copy of that exact version, or any
    folder passed as `docs_dir`, is used instead when present.

Whole files are held out for evaluation by a hash of their path (`heldout_percent` of them), so the
split is the same on every machine. Output folder:
  train.jsonl / heldout.jsonl      {"source", "path", "text"} per file, sorted by (source, path)
  prompts-code.jsonl, prompts-prose.jsonl
                                    held-out prompts in the evaluation format {"turns": [...]}
  train-prompts.jsonl              prompts of the same form from training files (drafter training data)
  manifest.json                    versions, counts and the sha256 of every file above

Prompts are instruction-style continuation requests ("Continue this Python code: ..."), the form the
built-in target is pretrained to answer (see dspark.pipeline.pretrain).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import DSparkError

DOCS_PACKAGE = "python3.11-doc"
DOCS_PACKAGE_VERSION = "3.11.2-6+deb12u8"
DOCS_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
EXCLUDED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
CODE_INSTRUCTION = "Continue this Python code:"
PROSE_INSTRUCTION = "Continue this passage from the Python documentation:"


class CorpusError(DSparkError):
    """A corpus source is missing or unusable."""


@dataclass(frozen=True)
class Document:
    source: str  # "stdlib" | "docs"
    path: str  # relative to its source root, POSIX separators
    text: str


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(root: Path) -> list[Document]:
    if not root.is_dir() or not (root / "os.py").is_file():
        raise CorpusError(f"{root}: not a Python standard library folder (no os.py)")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_STDLIB_PARTS.intersection(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document("stdlib", rel.as_posix(), text))
    return docs


def docs_documents(root: Path) -> list[Document]:
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise CorpusError(f"{root}: no *.rst.txt files (expected the _sources folder of {DOCS_PACKAGE})")
    return [Document("docs", f.relative_to(root).as_posix(), f.read_text(encoding="utf-8", errors="replace"))
            for f in files if f.read_text(encoding="utf-8", errors="replace").strip()]


def _installed_docs_version() -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DOCS_PACKAGE], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def locate_docs(cache_dir: Path, version: str = DOCS_PACKAGE_VERSION) -> Path:
    """The `_sources` folder of `python3.11-doc` at `version`: installed, cached, or downloaded now."""
    installed = Path("/") / DOCS_SOURCES
    if installed.is_dir() and _installed_docs_version() == version:
        return installed
    unpacked = cache_dir / f"{DOCS_PACKAGE}_{version}"
    if (unpacked / DOCS_SOURCES).is_dir():
        return unpacked / DOCS_SOURCES
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(
            f"the Python documentation is missing: install Debian's {DOCS_PACKAGE}={version} "
            f"(or pass --docs DIR pointing at its html/_sources folder)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        got = subprocess.run(["apt-get", "download", f"{DOCS_PACKAGE}={version}"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise CorpusError(
                f"cannot download Debian package {DOCS_PACKAGE}={version}: {got.stderr.strip()[-300:]} — install it "
                f"(`apt-get install {DOCS_PACKAGE}={version}` upgrades the system Python; `apt-get download` does not) "
                f"or pass --docs DIR pointing at its html/_sources folder"
            )
        staging = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        if not (staging / DOCS_SOURCES).is_dir():
            raise CorpusError(f"{debs[0].name}: has no {DOCS_SOURCES}")
        staging.rename(unpacked)
    return unpacked / DOCS_SOURCES


def is_heldout(doc: Document, heldout_percent: float) -> bool:
    digest = hashlib.sha256(f"{doc.source}/{doc.path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10000 < heldout_percent * 100


def continuation_prompt(doc: Document, rng: random.Random, prompt_lines: tuple[int, int] = (8, 24)) -> dict | None:
    """One {"turns": [...]} prompt: an instruction and a window of whole lines from `doc`.

    Windows start at a non-blank line; None when the file is too short.
    """
    lines = doc.text.splitlines()
    length = rng.randint(*prompt_lines)
    starts = [i for i in range(0, max(0, len(lines) - length - 4)) if lines[i].strip()]
    if not starts:
        return None
    start = rng.choice(starts)
    snippet = "\n".join(lines[start:start + length])
    instruction = CODE_INSTRUCTION if doc.source == "stdlib" else PROSE_INSTRUCTION
    return {"turns": [f"{instruction}\n\n{snippet}"], "source": f"{doc.source}/{doc.path}", "line": start + 1}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_corpus(
    out_dir: str | Path,
    *,
    stdlib_dir: str | Path | None = None,
    docs_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    heldout_percent: float = 3.0,
    prompts_per_set: int = 80,
    train_prompts: int = 4000,
    seed: int = 0,
) -> dict:
    """Write the corpus folder (see the module docstring) atomically and return its manifest."""
    stdlib_root = Path(stdlib_dir) if stdlib_dir else default_stdlib_dir()
    if docs_dir is not None:
        docs_root = Path(docs_dir)
        docs_version = "user-supplied"
    else:
        docs_root = locate_docs(Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "dspark-debs")
        docs_version = DOCS_PACKAGE_VERSION
    documents = stdlib_documents(stdlib_root) + docs_documents(docs_root)
    train = [d for d in documents if not is_heldout(d, heldout_percent)]
    heldout = [d for d in documents if is_heldout(d, heldout_percent)]

    rng = random.Random(seed)
    held_prompts: dict[str, list[dict]] = {}
    for name, source in (("code", "stdlib"), ("prose", "docs")):
        pool = [d for d in heldout if d.source == source]
        rows = []
        for i in range(prompts_per_set * 20):
            if len(rows) == prompts_per_set or not pool:
                break
            prompt = continuation_prompt(pool[i % len(pool)], rng)
            if prompt is not None:
                rows.append(prompt)
        held_prompts[name] = rows
    train_rows = []
    for _ in range(train_prompts * 3):
        if len(train_rows) == train_prompts:
            break
        prompt = continuation_prompt(rng.choice(train), rng)
        if prompt is not None:
            train_rows.append(dict(prompt, id=f"train-{len(train_rows)}"))

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_jsonl(staging / "train.jsonl", [d.__dict__ for d in train])
        _write_jsonl(staging / "heldout.jsonl", [d.__dict__ for d in heldout])
        _write_jsonl(staging / "prompts-code.jsonl", held_prompts["code"])
        _write_jsonl(staging / "prompts-prose.jsonl", held_prompts["prose"])
        _write_jsonl(staging / "train-prompts.jsonl", train_rows)
        manifest = {
            "format": "dspark-corpus-v1",
            "python": sys.version.split()[0],
            "stdlib_dir": str(stdlib_root),
            "docs_package": f"{DOCS_PACKAGE}={docs_version}",
            "heldout_percent": heldout_percent,
            "seed": seed,
            "documents": {"train": len(train), "heldout": len(heldout)},
            "characters": {"train": sum(len(d.text) for d in train), "heldout": sum(len(d.text) for d in heldout)},
            "prompts": {"code": len(held_prompts["code"]), "prose": len(held_prompts["prose"]), "train": len(train_rows)},
            "sha256": {p.name: _sha256(p) for p in sorted(staging.glob("*.jsonl"))},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_documents(path: str | Path) -> list[Document]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found (build it with `dspark data corpus`)")
    docs = [Document(**json.loads(line)) for line in path.open(encoding="utf-8") if line.strip()]
    if not docs:
        raise CorpusError(f"{path}: empty corpus file")
    return docs
