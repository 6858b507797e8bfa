"""Finished runs kept in memory for the slider, by id.

Two bounds, both least-recently-used: at most `capacity` runs (their latents are small), and at most
`frame_budget` bytes of decoded frames; a run whose frames were dropped is re-decoded on its next use.
"""
from __future__ import annotations

import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from ..errors import RunExpired


class RunStore:
    """Thread-safe map id -> list of runs (one run, or one per sampler of a comparison).

    Each id owns a folder under `output_dir` for its exports; the folder goes with the evicted run.
    """

    def __init__(self, output_dir: Path, capacity: int = 32, frame_budget: int = 512 * 2**20):
        self.output_dir, self.capacity, self.frame_budget = Path(output_dir), capacity, frame_budget
        self._runs: OrderedDict[str, list] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def add(self, runs: list, run_id: str | None = None, pinned: bool = False) -> str:
        """Keep `runs` under `run_id` (a new id by default); pinned runs are never evicted."""
        run_id = run_id or self.new_id()
        with self._lock:
            self._runs[run_id] = runs
            if pinned:
                self._pinned.add(run_id)
            evictable = [k for k in self._runs if k not in self._pinned]
            while len(self._runs) - len(self._pinned) > self.capacity:
                old = evictable.pop(0)
                del self._runs[old]
                shutil.rmtree(self.output_dir / old, ignore_errors=True)
            self._drop_frames_over_budget()
        return run_id

    def __contains__(self, run_id) -> bool:
        return run_id in self._runs

    def frame_bytes(self) -> int:
        return sum(_frame_bytes(run) for runs in self._runs.values() for run in runs)

    def _drop_frames_over_budget(self) -> None:
        """Forget decoded frames of the least recently used runs (never the newest nor a pinned one, which may
        have no latents to re-decode from) until under budget."""
        total = self.frame_bytes()
        for run_id, runs in list(self._runs.items())[:-1]:
            if run_id in self._pinned:
                continue
            if total <= self.frame_budget:
                return
            for run in runs:
                total -= _frame_bytes(run)
                run.frames = {}

    def get(self, run_id: str | None, redecode=None) -> list:
        """The runs of `run_id`, most recently used now; `redecode(run)` restores dropped frames."""
        with self._lock:
            if not run_id or run_id not in self._runs:
                raise RunExpired(run_id)
            self._runs.move_to_end(run_id)
            runs = self._runs[run_id]
            if redecode is not None and any("xt" not in r.frames for r in runs):
                for run in runs:
                    redecode(run)
                self._drop_frames_over_budget()
            return runs

    def folder(self, run_id: str) -> Path:
        """The export folder of a stored run (created on demand)."""
        self.get(run_id)
        path = self.output_dir / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __len__(self) -> int:
        return len(self._runs)


def _frame_bytes(run) -> int:
    return sum(frame.nbytes for frames in run.frames.values() for frame in frames)
