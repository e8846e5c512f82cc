"""Where the project keeps what it builds: models and data, relative to the working directory."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(os.environ.get("SUBJECTIVE_MODELS_DIR", "models"))
DATA_DIR = Path(os.environ.get("SUBJECTIVE_DATA_DIR", "data"))
DEFAULT_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct"
