"""Metric writers behind one small protocol; the loop receives them as arguments.

``JsonlWriter`` is the source of truth (``metrics.jsonl``: one object per line
with ``step``, ``split`` and metric names). The others mirror it:

- ``TensorBoardWriter``: event files via tensorboardX (no TensorFlow), tags
  ``{split}/{metric}`` (``{split}/{metric}/seed_{s}`` for seed runs);
  ``read_tensorboard`` reads them back without TensorBoard installed.
- ``LogWriter`` (alias ``ConsoleWriter``): plain lines on a stream.
- ``Progress``: the loop's tqdm bar on a terminal, else ``LogWriter`` lines.
- ``WandbWriter`` / ``MlflowWriter``: imported only when asked for; a missing
  package is a one-line ``WriterError``.

``create_writers(config, workdir)`` builds the list a run asks for.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import math
import os
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol


class WriterError(ValueError):
    """A writer that cannot be created as asked (message is one line)."""


def cannot_write(path: str, error: OSError) -> WriterError:
    """The one-line error for a file the run must write but cannot."""
    return WriterError(f"cannot write {path}: {error.strerror or error}")


class MetricWriter(Protocol):
    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN/Inf


def json_ready(x: Any) -> Any:
    """``x`` for strict JSON: nested dicts and lists of floats (``None`` for NaN/inf),
    ints and bools; numpy arrays and scalars become their Python values."""
    import numpy as np

    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(path: str, record: Any, *, indent: int = 2) -> None:
    """``record`` as strict JSON (``json_ready``), replacing ``path`` atomically."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(json_ready(record), f, indent=indent, allow_nan=False)
    os.replace(path + ".tmp", path)


def _tagged(split: str, metrics: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """``{split}/{name}`` -> value; a ``seed`` entry (seed runs) suffixes every tag."""
    seed = metrics.get("seed")
    suffix = f"{sep}seed_{int(seed)}" if seed is not None else ""
    return {f"{split}{sep}{k}{suffix}": float(v) for k, v in metrics.items() if k != "seed"}


class JsonlWriter:
    """Appends ``{"step", "split", **metrics}`` lines to ``path`` (flushed per line)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as e:  # e.g. a file left read-only or immutable by a user
            raise cannot_write(path, e) from None

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "split": split,
                  **{k: int(v) if k == "seed" else _clean(v) for k, v in metrics.items()}}
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


ConsoleWriter = LogWriter


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "log"
        self.mode = mode if enabled else "none"
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._log = LogWriter() if self.mode == "log" else None

    def update(self, step: int, n: int, split: str, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        elif self._log is not None:
            self._log.write(step, split, metrics)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self._log is not None:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _import_summary_writer() -> type:
    """``tensorboardX.SummaryWriter``, imported without importing PyTorch.

    ``tensorboardX.writer`` runs ``try: import torch`` at import time, only to accept
    torch tensors, which this writer never passes. Where PyTorch is installed, as it
    often is beside JAX, that import took ~2.7 s and ~190 MB of a digits-MLP run
    (``experiments.digits_mlp``, 2-core CPU: 7.9-8.6 s against 5.2-5.8 s, peak RSS
    546 against 360 MB). So unless something imported torch already, ``import torch``
    fails (``sys.modules["torch"] = None``) for the length of this one import, and
    works as before after it."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalars as TensorBoard event files in ``logdir`` (``tensorboard --logdir DIR``).

    ``config`` (optional, JSON-serializable) is stored once as a text summary
    so the run's settings show next to its curves. ``purge_step`` (a resumed
    run's first step; 0 for a fresh start over an attempt that left no checkpoint)
    hides what an earlier attempt wrote from that step on, as ``metrics.jsonl``
    drops those lines.
    """

    def __init__(self, logdir: str, *, config: Mapping[str, Any] | None = None,
                 purge_step: int | None = None, flush_secs: int = 10):
        try:
            SummaryWriter = _import_summary_writer()
        except ImportError as e:
            raise WriterError(
                "TensorBoard output needs tensorboardX: pip install tensorboardX "
                "(or pass --no-tensorboard)"
            ) from e
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        # The suffix keeps a second writer in the same second (a quick resume) from
        # truncating the first one's file (tensorboardX names files by whole seconds).
        self._w = SummaryWriter(logdir=logdir, flush_secs=flush_secs, purge_step=purge_step,
                                filename_suffix=f".{time.time_ns()}")
        if config is not None and not purge_step:  # a new run (purge_step 0: a fresh start)
            text = json.dumps(dict(config), indent=2, default=str)
            self._w.add_text("config", "```\n" + text + "\n```", 0)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for tag, value in _tagged(split, metrics).items():
            self._w.add_scalar(tag, value, int(step))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


OPTIONAL_BACKENDS = {"wandb_project": "wandb", "mlflow_experiment": "mlflow"}


def check_optional_writers(config: Any) -> None:
    """Raises ``WriterError`` (one line) when ``config`` asks for a backend whose
    package is not installed; imports nothing (called before anything is written)."""
    for field, module in OPTIONAL_BACKENDS.items():
        if getattr(config, field, "") and importlib.util.find_spec(module) is None:
            flag = "--" + field.replace("_", "-")
            raise WriterError(f"{flag} needs the {module} package: pip install {module}")


def _import_optional(module: str, flag: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WriterError(f"{flag} needs the {module} package: pip install {module}") from None


class WandbWriter:
    """Weights & Biases: one run, metrics logged as ``{split}/{metric}`` at ``step``."""

    def __init__(self, project: str, *, workdir: str | None = None,
                 config: Mapping[str, Any] | None = None, name: str | None = None):
        wandb = _import_optional("wandb", "--wandb-project")
        self._run = wandb.init(project=project, dir=workdir, name=name,
                               config=dict(config or {}))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        self._run.log(_tagged(split, metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


class MlflowWriter:
    """MLflow: one run in ``experiment``; params from ``config``, metrics ``{split}/{metric}``."""

    def __init__(self, experiment: str, *, config: Mapping[str, Any] | None = None,
                 name: str | None = None):
        self._mlflow = _import_optional("mlflow", "--mlflow-experiment")
        self._mlflow.set_experiment(experiment)
        self._mlflow.start_run(run_name=name)
        if config:
            # MLflow params are short strings; nested values are stored as JSON.
            self._mlflow.log_params({k: v if isinstance(v, (int, float, str, bool)) or v is None
                                     else json.dumps(v) for k, v in config.items()})

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics(_tagged(split, metrics), step=int(step))

    def close(self) -> None:
        self._mlflow.end_run()


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


def create_writers(config: Any, workdir: str, *, resume_step: int | None = None
                   ) -> list[MetricWriter]:
    """The writers ``config`` asks for: ``metrics.jsonl`` always, TensorBoard under
    ``workdir/tensorboard`` unless ``config.tensorboard`` is false, W&B when
    ``config.wandb_project`` is set, MLflow when ``config.mlflow_experiment`` is set.
    ``resume_step``: the step a resumed run starts from (TensorBoard hides later
    steps an earlier attempt wrote).

    Optional backends are created first, so a missing package fails before any
    file is opened. TensorBoard is on by default, so a missing tensorboardX only
    warns (one line on stderr) and the run goes on without event files."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    name = os.path.basename(os.path.normpath(workdir))
    writers: list[MetricWriter] = []
    if getattr(config, "wandb_project", ""):
        writers.append(WandbWriter(config.wandb_project, workdir=workdir, config=cfg, name=name))
    if getattr(config, "mlflow_experiment", ""):
        writers.append(MlflowWriter(config.mlflow_experiment, config=cfg, name=name))
    if getattr(config, "tensorboard", True) and importlib.util.find_spec("tensorboardX") is None:
        print("warning: tensorboardX is not installed, so no TensorBoard files are written "
              "(pip install tensorboardX, or pass --no-tensorboard)", file=sys.stderr)
    elif getattr(config, "tensorboard", True):
        writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard"), config=cfg,
                                         purge_step=resume_step))
    writers.insert(0, JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
    return writers


# ----------------------------------------------------------------------------- reading back


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Scalar(NamedTuple):
    step: int
    tag: str
    value: float
    wall_time: float


def _records(path: str) -> Iterator[bytes]:
    """Payloads of a TFRecord file (TensorBoard's event format), CRCs checked.

    A record is ``u64 length, u32 masked_crc(length), data, u32 masked_crc(data)``;
    a truncated last record (a writer still running) ends the file."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            (length,) = struct.unpack("<Q", header)
            crc_bytes = f.read(4)
            data = f.read(length)
            footer = f.read(4)
            if len(crc_bytes) < 4 or len(data) < length or len(footer) < 4:
                return
            if struct.unpack("<I", crc_bytes)[0] != masked_crc32c(header):
                raise ValueError(f"{path}: corrupt record header (CRC mismatch)")
            if struct.unpack("<I", footer)[0] != masked_crc32c(data):
                raise ValueError(f"{path}: corrupt record data (CRC mismatch)")
            yield data


def read_tensorboard(logdir: str) -> list[Scalar]:
    """Every scalar in the event files under ``logdir`` (sorted by step, then tag).

    Reads the files directly (tensorboardX's protos + CRC checks), so neither
    TensorFlow nor TensorBoard is needed. Like TensorBoard, a ``SessionLog.START``
    at step ``s`` (a resumed run's ``purge_step``) drops what was read before
    with step >= ``s``; files are read in the order they were written."""
    from tensorboardX.proto import event_pb2

    out: list[Scalar] = []
    paths = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    # file names are events.out.tfevents.<unix time>.<host>...: oldest first
    paths.sort(key=lambda p: (_file_time(p), p))
    for path in paths:
        for data in _records(path):
            event = event_pb2.Event.FromString(data)
            if (event.HasField("session_log")
                    and event.session_log.status == event_pb2.SessionLog.START):
                out = [s for s in out if s.step < event.step]
                continue
            if not event.HasField("summary"):
                continue
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    value = v.simple_value
                elif v.HasField("tensor") and v.tensor.float_val:
                    value = v.tensor.float_val[0]
                else:
                    continue  # text, images, ...
                out.append(Scalar(int(event.step), v.tag, float(value), float(event.wall_time)))
    return sorted(out, key=lambda s: (s.step, s.tag))


def _file_time(path: str) -> int:
    try:
        return int(os.path.basename(path).split(".")[3])
    except (IndexError, ValueError):
        return 0
