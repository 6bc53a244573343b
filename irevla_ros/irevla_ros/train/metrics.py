"""Training scalars: TensorBoard event files for people, and a JSON-lines twin that the reports plot from.

    log = MetricsLog(run_dir)                 # run_dir/tensorboard/ and run_dir/metrics.jsonl
    log.scalar("stage1/policy_loss", 0.12, step=40, iteration=1)
    log.close()

The JSON-lines file is appended and flushed per line, so a SIGKILL loses at most the line being written, and a
restarted trainer appends to the same file (`read_metrics` skips a torn last line).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JSONL = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.run_dir / JSONL, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), flush_secs=10)

    def scalar(self, name: str, value: float, step: int, **tags: Any) -> None:
        value = float(value)
        if not math.isfinite(value):
            tags = {**tags, "non_finite": str(value)}
            value_out: float | None = None
        else:
            value_out = value
        line = json.dumps({"t": time.time(), "name": name, "value": value_out, "step": int(step), **tags})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            if self._writer is not None and value_out is not None:
                self._writer.add_scalar(name, value_out, int(step))

    def scalars(self, prefix: str, values: dict[str, float], step: int, **tags: Any) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(f"{prefix}/{key}", value, step, **tags)

    def flush(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None


def read_metrics(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / JSONL
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
