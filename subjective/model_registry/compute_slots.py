"""Per-request compute counters shared between vLLM's worker and the front end.

vLLM runs the model in another process (the engine core) and its outputs carry no field of
ours, so the worker adds what each request executed to a row of a small memory-mapped table,
and the front end reads that row when the request ends. The front end owns the rows: it hands
a request a free `slot` and a random `tag` through `SamplingParams.extra_args`, and the worker
only adds to a row whose tag matches, so a late step of an aborted request cannot leak into a
reused row. Freed rows go to the back of a FIFO, so a row is reused only after every other one.

The worker's write happens before the step's outputs leave the engine core, so by the time the
front end sees a request finish, the row holds every step that produced its tokens.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VAR = "SUBJECTIVE_COMPUTE_SLOTS"
EXTRA_ARG_SLOT = "meter_slot"
EXTRA_ARG_TAG = "meter_tag"

# Counter columns after the tag column, in the order `add` takes them.
FIELDS = (
    "prompt_flops",
    "prompt_dense_flops",
    "completion_flops",
    "completion_dense_flops",
    "kv_entries",
    "kv_entries_dense",
    "token_layers",  # (token, gated layer) pairs decided
    "token_layers_skipped",  # of those, the ones that took the cheap path
)
COLUMNS = 1 + len(FIELDS)
DEFAULT_SLOTS = 65536


@dataclass(frozen=True)
class ComputeCounts:
    prompt_flops: int
    prompt_dense_flops: int
    completion_flops: int
    completion_dense_flops: int
    kv_entries: int
    kv_entries_dense: int
    token_layers: int
    token_layers_skipped: int

    @property
    def flops(self) -> int:
        return self.prompt_flops + self.completion_flops

    @property
    def dense_flops(self) -> int:
        return self.prompt_dense_flops + self.completion_dense_flops

    @property
    def metered(self) -> bool:
        """Whether a worker wrote anything (a dense model served without our plugin does not)."""
        return self.dense_flops > 0


TABLE_PREFIX = "subjective-compute-"


def table_folder() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def default_path() -> Path:
    return table_folder() / f"{TABLE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.i64"


def read_left_row(path: str | Path, slot: int, tag: int) -> ComputeCounts | None:
    """A row of a table its front end left behind (it died), if the row still belongs to
    `tag`; None when the table or the row is gone."""
    try:
        rows = np.memmap(path, dtype=np.int64, mode="r").reshape(-1, COLUMNS)
    except (OSError, ValueError):
        return None
    if not 0 <= slot < len(rows) or int(rows[slot, 0]) != tag:
        return None
    return ComputeCounts(*(int(v) for v in rows[slot, 1:]))


def reclaim_left_tables(folder: Path | None = None) -> list[Path]:
    """Delete the tables of front ends no longer running (killed before their `close`)."""
    removed = []
    for path in (folder or table_folder()).glob(f"{TABLE_PREFIX}*.i64"):
        pid = path.name.removeprefix(TABLE_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class _Table:
    def __init__(self, path: Path, rows: np.memmap) -> None:
        self.path = path
        self.rows = rows


class WorkerSlots(_Table):
    """The worker's side: attach to the table the front end created, add a step's counts."""

    @classmethod
    def from_env(cls) -> WorkerSlots | None:
        """The table named by `SUBJECTIVE_COMPUTE_SLOTS`, or None when nobody meters."""
        path = os.environ.get(ENV_VAR)
        if not path:
            return None
        rows = np.memmap(path, dtype=np.int64, mode="r+")
        return cls(Path(path), rows.reshape(-1, COLUMNS))

    def add(self, slot: int, tag: int, counts: np.ndarray) -> None:
        """Add `counts` (int64, `len(FIELDS)`) to `slot` if it still belongs to `tag`."""
        if 0 <= slot < len(self.rows) and self.rows[slot, 0] == tag:
            self.rows[slot, 1:] += counts

    def add_many(self, slots: np.ndarray, tags: np.ndarray, counts: np.ndarray) -> None:
        """`add` for several distinct slots at once: `counts` `[len(slots), len(FIELDS)]`."""
        inside = (slots >= 0) & (slots < len(self.rows))
        owned = inside.copy()
        owned[inside] = self.rows[slots[inside], 0] == tags[inside]
        self.rows[slots[owned], 1:] += counts[owned]


class FrontEndSlots(_Table):
    """The front end's side: create the table, lend rows to requests, read them back."""

    def __init__(self, path: Path, rows: np.memmap) -> None:
        super().__init__(path, rows)
        self._free: deque[int] = deque(range(len(rows)))

    @classmethod
    def create(cls, path: Path | None = None, slots: int = DEFAULT_SLOTS) -> FrontEndSlots:
        path = path or default_path()
        rows = np.memmap(path, dtype=np.int64, mode="w+", shape=(slots, COLUMNS))
        return cls(path, rows)

    def acquire(self) -> tuple[int, int]:
        """A zeroed row and its fresh tag, for one API request."""
        if not self._free:
            raise RuntimeError("every compute slot is in use")
        slot = self._free.popleft()
        tag = secrets.randbits(62) + 1
        self.rows[slot, 1:] = 0
        self.rows[slot, 0] = tag
        return slot, tag

    def read(self, slot: int) -> ComputeCounts:
        return ComputeCounts(*(int(v) for v in self.rows[slot, 1:]))

    @property
    def available(self) -> int:
        """Rows free to lend."""
        return len(self._free)

    def release(self, slot: int) -> None:
        self.rows[slot, 0] = 0
        self._free.append(slot)

    def close(self) -> None:
        del self.rows
        self.path.unlink(missing_ok=True)
