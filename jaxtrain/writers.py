"""Metric writers behind one small protocol; the loop receives them as arguments.

``JsonlWriter`` is the source of truth (``metrics.jsonl``: one object per line
with ``step``, ``split`` and metric names). Others mirror it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class MetricWriter(Protocol):
    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN/Inf


class JsonlWriter:
    """Appends ``{"step", "split", **metrics}`` lines to ``path`` (flushed per line)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class LogWriter:
    """Plain log lines on a stream (for when stdout is not a terminal)."""

    def __init__(self, stream=None):
        self._stream = stream or sys.stdout

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        parts = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        print(f"step {step} {split}: {parts}", file=self._stream, flush=True)

    def close(self) -> None:
        pass


class MultiWriter:
    """Fans out to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write(step, split, metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
