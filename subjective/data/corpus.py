"""Build train/validation text from the Python documentation sources (Debian `python3.11-doc`).

The split is by file, decided by a hash of the file's path: deterministic, independent of
file order or of files added later, and no document leaks across the split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
DEBIAN_PACKAGE = "python3.11-doc"
VALIDATION_PERCENT = 10
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class SplitStats:
    files: int
    characters: int
    tokens: int


def source_files(root: Path = PYTHON_DOC_SOURCES) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is missing: install Debian's {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE})"
        )
    return sorted(root.rglob("*.rst.txt"))


def split_of(relative_path: str) -> str:
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def build_corpus(output_dir: Path, tokenizer, root: Path = PYTHON_DOC_SOURCES) -> dict:
    """Write `train.txt`, `validation.txt` and `manifest.json` (sizes in files, chars, tokens)."""
    documents: dict[str, list[str]] = {"train": [], "validation": []}
    names: dict[str, list[str]] = {"train": [], "validation": []}
    for path in source_files(root):
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            documents[split_of(relative)].append(text)
            names[split_of(relative)].append(relative)

    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"source": f"Debian {DEBIAN_PACKAGE}: {root}", "splits": {}}
    for split, texts in documents.items():
        body = DOCUMENT_SEPARATOR.join(texts) + "\n"
        tokens = len(tokenizer.encode(body, add_special_tokens=False))
        stats = SplitStats(files=len(texts), characters=len(body), tokens=tokens)
        partial = output_dir / f"{split}.txt.partial"
        partial.write_text(body, encoding="utf-8")
        partial.replace(output_dir / f"{split}.txt")
        manifest["splits"][split] = {**stats.__dict__, "documents": names[split]}
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
