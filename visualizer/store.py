"""Finished runs kept in memory for the slider, by id; least recently used dropped beyond a capacity."""
from __future__ import annotations

import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path


class RunExpired(KeyError):
    def __str__(self) -> str:
        return "This run is no longer in memory (the app keeps only the most recent ones). Generate it again."


class RunStore:
    """Thread-safe map id -> list of runs (one run, or one per sampler of a comparison).

    Each id owns a folder under `output_dir` for its exports; the folder goes with the evicted run.
    """

    def __init__(self, output_dir: Path, capacity: int = 32):
        self.output_dir, self.capacity = Path(output_dir), capacity
        self._runs: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, runs: list) -> str:
        run_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._runs[run_id] = runs
            while len(self._runs) > self.capacity:
                old, _ = self._runs.popitem(last=False)
                shutil.rmtree(self.output_dir / old, ignore_errors=True)
        return run_id

    def get(self, run_id: str | None) -> list:
        with self._lock:
            if not run_id or run_id not in self._runs:
                raise RunExpired(run_id)
            self._runs.move_to_end(run_id)
            return self._runs[run_id]

    def folder(self, run_id: str) -> Path:
        """The export folder of a stored run (created on demand)."""
        self.get(run_id)
        path = self.output_dir / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __len__(self) -> int:
        return len(self._runs)
