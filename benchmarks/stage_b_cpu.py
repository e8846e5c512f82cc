"""Stage B of the gating recipe at CPU scale, on the shipped SDT: what it buys, measured.

Distils the shipped adapter's priors under the inference routing (`subjective train --routing
router --teacher DENSE --freeze-base`, resumable in `--work`), then measures the dense model,
the shipped model (stage A only) and the distilled one at the shipped base threshold and quality
levels (perplexity and the meter's reductions, the rows `gating_frontier.py` writes) on two
texts: the frontier's validation blocks (the training text's domain) and Perl's POD manuals
(another domain: the priors are also trained on next-token loss, so an in-domain gain alone
could be domain adaptation rather than a smaller gap to the dense model). The shipped adapters
are not replaced here.

    python benchmarks/stage_b_cpu.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_quality import evaluate, frontier_rows  # noqa: E402
from subjective.machine import machine_info  # noqa: E402
from subjective.model_registry.convert import load_model  # noqa: E402
from subjective.model_registry.layer_states import text_blocks  # noqa: E402

FRONTIER = REPO / "benchmarks" / "results" / "gating_frontier.json"
# Perl's manuals, from Debian's perl-modules package (installed with perl).
POD_DIR = Path("/usr/share/perl/5.36.0")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-SDT")
    p.add_argument("--data", type=Path, default=REPO / "data" / "train.txt")
    p.add_argument("--pod-dir", type=Path, default=POD_DIR, help="the other domain's text")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "stage_b_cpu")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks/results/stage_b_cpu.json")
    return p.parse_args()


def distil(args: argparse.Namespace) -> Path:
    """Stage B into `work/trained` (continuing a cut run); returns the trained model's folder."""
    from subjective.cli import main as subjective

    trained = args.work / "trained"
    subjective([
        "train", str(args.model), "--data", str(args.data), "--output", str(trained),
        "--teacher", str(args.dense), "--freeze-base", "--routing", "router",
        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--block-size", str(args.block_size), "--lr", str(args.lr),
        "--save-every", "50", "--resume",
    ])  # fmt: skip
    return trained / "model"


def other_domain(pod_dir: Path, work: Path) -> Path:
    pods = sorted(pod_dir.rglob("*.pod"))
    if not pods:
        raise SystemExit(f"no .pod files in {pod_dir} (Debian's perl-modules); see --pod-dir")
    text = work / "other_domain.txt"
    text.write_text("\n\n".join(pod.read_text(errors="replace") for pod in pods))
    return text


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    trained = distil(args)
    trained_s = time.monotonic() - started
    spec = json.loads(FRONTIER.read_text())["validation"]
    texts = {"validation": REPO / spec["text"], "perl_pod": other_domain(args.pod_dir, args.work)}
    device = torch.device("cpu")
    dense_model = load_model(args.dense)
    results = {}
    for name, path in texts.items():
        blocks = text_blocks(path, args.dense, spec["blocks"], spec["block_size"], spec["seed"])
        dense = evaluate(dense_model, blocks, None)
        print(f"{name}: dense {dense['perplexity']:.3f}")
        rows = frontier_rows(args.model, blocks, device, "shipped (stage A)")
        rows += frontier_rows(trained, blocks, device, "stage A + B, CPU")
        for row in rows:
            row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"] - 1
        results[name] = {"dense": dense, "rows": rows}
    history = (trained.parent / "history.jsonl").read_text().splitlines()
    report = {
        "command": "python benchmarks/stage_b_cpu.py",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "eval_blocks": spec,
        "stage_b_last": json.loads(history[-1]),
        "results": results,
        "seconds": {"stage_b": trained_s, "total": time.monotonic() - started},
        "machine": machine_info(),
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
