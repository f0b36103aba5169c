"""Bad input from the command line: one ``error:`` line, exit status 2, workdir untouched.

Every row of the table in docs/BAD_INPUTS.md is a ``BAD`` case here (the doc is
checked against this list). Cases run in-process through
``experiments.digits_mlp.main(argv)``; a few run as real subprocesses to prove
the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import numpy as np
import pytest

from experiments import digits_mlp
from jaxtrain import cli, models, workdir_lock
from jaxtrain import data as data_lib
from jaxtrain.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUTS.md"
BASE = ("--epochs", "1", "--progress", "none", "--compilation-cache", "")


# ----------------------------------------------------------------------------- fixtures


def tree_hash(path: Path) -> str:
    """Digest of every folder and file (relative path and bytes) under ``path``."""
    h = hashlib.sha256()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.exists():
        return "absent"
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in dirs:
            h.update(f"D {os.path.relpath(os.path.join(d, name), path)}\n".encode())
        for name in sorted(files):
            full = os.path.join(d, name)
            h.update(f"F {os.path.relpath(full, path)}\n".encode())
            h.update(hashlib.sha256(Path(full).read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A workdir holding a finished 1-epoch digits run (config, metrics, a checkpoint)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert digits_mlp.main([*BASE, "--workdir", str(workdir)]) == 0
    assert (workdir / "checkpoints").is_dir() and (workdir / "summary.json").is_file()
    return workdir


def _bad_labels(monkeypatch):
    train, test = data_lib.load_digits()
    train = {**train, "label": np.where(np.arange(len(train["label"])) == 7, 10, train["label"])}
    monkeypatch.setattr(data_lib, "load_digits", lambda: (train, test))


def _nan_pixels(monkeypatch):
    train, test = data_lib.load_digits()
    image = train["image"].copy()
    image[3, 2, 2, 0] = np.nan
    monkeypatch.setattr(data_lib, "load_digits", lambda: ({**train, "image": image}, test))


def _unscaled_pixels(monkeypatch):  # a source that forgot to divide by 255 (here 16)
    train, test = data_lib.load_digits()
    def scale(s):
        return {**s, "image": s["image"] * 16}

    monkeypatch.setattr(data_lib, "load_digits", lambda: (scale(train), scale(test)))


class _Needs16px(nn.Module):
    """A registry-shaped model that refuses images under 16 px (as a real one might)."""

    num_classes: int
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    dropout: float = 0.0
    dtype: object = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.shape[1] < 16:
            raise ValueError(f"input must be at least 16x16 px, got {x.shape[1]}x{x.shape[2]}")
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _strict_model(monkeypatch):
    monkeypatch.setitem(models.MODELS, "needs16px", _Needs16px)


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Bad:
    id: str
    argv: tuple[str, ...]
    message: str | tuple[str, ...]  # part(s) of the one error line (no paths)
    workdir: str = "finished"  # finished | busy | notes | file | under-file | proc
    patch: Callable | None = None
    tfds: bool = False  # the message comes from TFDS itself (skipped where it is not installed)

    def __str__(self) -> str:
        return self.id

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.message,) if isinstance(self.message, str) else self.message


BAD = [
    # --- command-line values
    Bad("batch-size-zero", ("--batch-size", "0"), "--batch-size must be > 0, got 0"),
    Bad("batch-size-text", ("--batch-size", "abc"), "argument --batch-size: invalid int value: 'abc'"),
    Bad("lr-nan", ("--lr", "nan"), "--lr must be finite and > 0, got nan"),
    Bad("lr-negative", ("--lr", "-0.1"), "--lr must be finite and > 0, got -0.1"),
    Bad("epochs-zero", ("--epochs", "0"), "--epochs must be > 0, got 0"),
    Bad("dropout-one", ("--dropout", "1"), "--dropout must be in [0, 1), got 1.0"),
    Bad("seed-too-large", ("--seed", "4294967296"), "--seed must be in [0, 2**32)"),
    Bad("seed-chunk-negative", ("--num-seeds", "4", "--seed-chunk", "-1"),
        "--seed-chunk must be >= 0, got -1"),
    Bad("unknown-model", ("--model", "resnet"),
        "unknown --model 'resnet'; choose one of ['cnn', 'mlp', 'resnet18', 'resnet_tiny']"),
    Bad("unknown-optimizer", ("--optimizer", "adagrad"),
        "unknown --optimizer 'adagrad'; choose one of ['sgd', 'momentum', 'adam', 'adamw']"),
    Bad("unknown-schedule", ("--schedule", "linear"),
        "unknown --schedule 'linear'; choose one of ['constant', 'cosine', 'step']"),
    Bad("unknown-choice", ("--parallel", "gpu"), "argument --parallel: invalid choice: 'gpu'"),
    Bad("unknown-flag", ("--learning-rate", "0.1"), "unrecognized arguments: --learning-rate 0.1"),
    Bad("abbreviated-flag", ("--batch", "64"), "unrecognized arguments: --batch 64"),
    Bad("synthetic-shape-2d", ("--dataset", "synthetic", "--synthetic-shape", "8,8"),
        "--synthetic-shape must be H,W,C > 0, got (8, 8)"),
    Bad("synthetic-shape-text", ("--synthetic-shape", "8,a,1"),
        "argument --synthetic-shape: invalid comma-separated int value: '8,a,1'"),
    Bad("coordinator-without-port", ("--coordinator-address", "10.0.0.1"),
        "--coordinator-address must be HOST:PORT, got '10.0.0.1'"),
    Bad("process-id-out-of-range", ("--num-processes", "2", "--process-id", "2"),
        "--process-id 2 must be < --num-processes 2"),
    Bad("peer-timeout-negative", ("--peer-timeout", "-5"),
        "--peer-timeout must be finite and >= 0, got -5.0"),
    # --- data
    Bad("dataset-misspelled", ("--dataset", "Digits"),
        "unknown --dataset 'Digits'; choose digits, synthetic or a TFDS name such as mnist"),
    Bad("dataset-unknown-to-tfds", ("--dataset", "digitz"),
        "unknown --dataset 'digitz': TFDS has no such dataset", tfds=True),
    Bad("tfds-not-prepared", ("--dataset", "mnist", "--data-dir", "{tmp}"),
        "dataset 'mnist' is not prepared in", tfds=True),
    Bad("data-dir-missing", ("--dataset", "mnist", "--data-dir", "/nonexistent/tfds"),
        "--data-dir /nonexistent/tfds is not a directory"),
    Bad("too-few-examples", ("--dataset", "synthetic", "--synthetic-size", "50"),
        "--batch-size 64 is larger than the 36 training examples"),
    Bad("synthetic-without-test-examples", ("--dataset", "synthetic", "--synthetic-size", "2",
                                            "--batch-size", "1"),
        "dataset 'synthetic' has no test examples (--synthetic-size is too small)"),
    Bad("val-fraction-takes-every-example", ("--val-fraction", "0.9999"),
        "dataset 'digits' has no train examples (--val-fraction 0.9999 holds out all of them)"),
    Bad("no-validation-split", ("--val-fraction", "0"),
        "--val-fraction 0.0 holds out no validation examples"),
    Bad("labels-out-of-range", (), "dataset 'digits' train split: labels must be in [0, 10), "
        "found 0..10", patch=_bad_labels),
    Bad("nan-pixels", (), "dataset 'digits' train split: 1 non-finite pixel values",
        patch=_nan_pixels),
    Bad("pixels-not-in-0-1", (), "dataset 'digits' train split: pixel values must be in [0, 1], "
        "found 0..16", patch=_unscaled_pixels),
    Bad("model-rejects-image-shape", ("--model", "needs16px"),
        "--model needs16px cannot take 8x8x1 images of this dataset (ValueError: input must be "
        "at least 16x16 px, got 8x8)", patch=_strict_model),
    # --- devices
    Bad("batch-not-divisible", ("--batch-size", "60"),
        ("--batch-size 60 does not split", "8 device(s)", "multiple of 8", "56, 64")),
    Bad("too-many-devices", ("--devices", "9"),
        "--devices 9 asks for more than the 8 visible device(s)"),
    Bad("devices-negative", ("--devices", "-1"), "--devices must be >= 0, got -1"),
    Bad("devices-with-parallel-none", ("--devices", "2", "--parallel", "none"),
        "--parallel none runs on one device, but --devices 2 asks for more"),
    Bad("parallel-none-across-processes",
        ("--parallel", "none", "--num-processes", "2", "--process-id", "0",
         "--coordinator-address", "127.0.0.1:1234"),
        "--parallel none cannot run across several processes"),
    Bad("cpu-devices-negative", ("--cpu-devices", "-1"), "--cpu-devices must be >= 0, got -1"),
    Bad("cpu-devices-after-jax-started", ("--cpu-devices", "3"),
        "--cpu-devices 3 must be set before JAX starts (this process already has 8 CPU "
        "device(s)); start a new process or set JAX_NUM_CPU_DEVICES=3"),
    Bad("seeds-with-pmap", ("--num-seeds", "2", "--parallel", "pmap"),
        "--num-seeds > 1 runs with --parallel mesh or none, not pmap"),
    Bad("steps-per-call-with-pmap", ("--steps-per-call", "4", "--parallel", "pmap"),
        "--steps-per-call 4 needs one device or a mesh (--parallel none, mesh or auto), "
        "not --parallel pmap"),
    Bad("steps-per-call-on-a-mesh-with-host-data",
        ("--steps-per-call", "4", "--data-placement", "host"),
        "--steps-per-call 4 needs the training data on the devices (--data-placement device) "
        "when it runs on several; or one device (--parallel none)"),
    # --- paths
    Bad("workdir-is-a-file", (), "is a file, not a directory", workdir="file"),
    Bad("workdir-under-a-file", (), "cannot be created:", workdir="under-file"),
    Bad("workdir-not-writable", (), "is not writable (cannot create a file in /proc",
        workdir="proc"),
    Bad("workdir-in-use", (), ("--workdir", "is in use by another run (pid", "started",
                               "; wait for it to end or use another --workdir"), workdir="busy"),
    Bad("compilation-cache-not-writable", ("--compilation-cache", "/proc/jaxtrain-xla"),
        "(pass --compilation-cache '' to run without it)"),
    # --- checkpoints
    Bad("resume-must-without-checkpoint", ("--resume", "must"),
        "--resume must, but", workdir="notes"),
    Bad("resume-never-with-checkpoints", ("--resume", "never"),
        "--resume never, but"),
    Bad("checkpoint-of-another-config", ("--lr", "0.01"),
        "workdir holds checkpoints of a different run: --lr was 0.002, now 0.01"),
]


def _workdir(case: Bad, tmp_path: Path, finished_run: Path) -> Path:
    if case.workdir in ("finished", "busy"):  # busy: the test holds its lock meanwhile
        workdir = tmp_path / "run"
        shutil.copytree(finished_run, workdir)
    elif case.workdir == "notes":
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "notes.txt").write_text("my notes\n")
    elif case.workdir == "file":
        workdir = tmp_path / "run"
        workdir.write_text("not a folder\n")
    elif case.workdir == "under-file":
        (tmp_path / "file").write_text("not a folder\n")
        workdir = tmp_path / "file" / "run"
    else:
        workdir = Path("/proc/jaxtrain-test/run")
    return workdir


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input(case: Bad, tmp_path, finished_run, monkeypatch, capsys, caplog):
    if case.tfds:
        pytest.importorskip("tensorflow_datasets")
    if case.patch is not None:
        case.patch(monkeypatch)
    workdir = _workdir(case, tmp_path, finished_run)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    with _held(case, workdir):
        before = tree_hash(workdir)
        capsys.readouterr()

        status = digits_mlp.main([*BASE, *argv, "--workdir", str(workdir)])

        out, err = capsys.readouterr()
        after = tree_hash(workdir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(part in lines[0] for part in case.parts), lines[0]
    assert out == ""
    # Library log records (absl, orbax) reach stderr in a real process: none may appear.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert after == before, "the workdir changed"


def _held(case: Bad, workdir: Path):
    """The lock of another run on ``workdir`` for a ``busy`` case (this process holds it:
    flock refuses a second open file even in the same process)."""
    return workdir_lock.hold(str(workdir)) if case.workdir == "busy" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- subprocesses


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("case_id", ["lr-nan", "batch-not-divisible", "workdir-is-a-file",
                                     "workdir-in-use"])
def test_bad_input_in_a_real_process(case_id, tmp_path):
    case = next(c for c in BAD if c.id == case_id)
    workdir = _workdir(case, tmp_path, finished_run=tmp_path)  # no finished run needed
    if case.workdir in ("finished", "busy"):
        workdir.mkdir(exist_ok=True)
        (workdir / "notes.txt").write_text("keep\n")
    with _held(case, workdir):
        before = tree_hash(workdir)
        proc = _python("-m", "experiments.digits_mlp", *BASE, *case.argv, "--workdir",
                       str(workdir))
        assert tree_hash(workdir) == before
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(part in lines[0] for part in case.parts), lines[0]


def test_unexpected_failure_in_a_real_process_exits_1_with_traceback(tmp_path):
    script = (
        "import sys\n"
        "from jaxtrain.cli import run\n"
        "from jaxtrain.config import TrainConfig\n"
        "def body(config):\n"
        "    raise RuntimeError('disk on fire')\n"
        "sys.exit(run(TrainConfig, TrainConfig(), [], prog='x', body=body))\n"
    )
    proc = _python("-c", script)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: disk on fire")


def test_help_exits_0_and_lists_flags():
    proc = _python("-m", "experiments.digits_mlp", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--batch-size", "--lr", "--deterministic", "--workdir", "--on-nonfinite"):
        assert flag in proc.stdout


# ----------------------------------------------------------------------------- exit statuses


def _run(body, capsys, argv=()):
    status = cli.run(TrainConfig, TrainConfig(), list(argv), prog="x", body=body)
    return status, capsys.readouterr().err


def test_library_value_errors_are_failures_not_bad_input(capsys):
    """A ValueError raised inside numpy/JAX is a bug: exit 1 with the traceback."""

    def body(config):
        np.zeros(-1)

    status, err = _run(body, capsys)
    assert status == 1
    assert "Traceback" in err and "negative dimensions" in err


def test_own_value_errors_are_bad_input(capsys):
    """A plain ValueError raised by jaxtrain's own code (not only ConfigError) is bad input."""

    def body(config):
        models.create_model("nope", 10)

    status, err = _run(body, capsys)
    expected = "error: unknown model 'nope'; choose one of ['cnn', 'mlp', 'resnet18', 'resnet_tiny']"
    assert (status, err) == (2, expected + "\n")
    assert cli.one_line(ValueError("first line\n  second line\n")) == "first line; second line"


def test_missing_file_named_by_our_code_is_bad_input(capsys, tmp_path):
    from jaxtrain.checkpoint import load_params

    status, err = _run(lambda config: load_params(str(tmp_path)), capsys)
    assert (status, err) == (2, f"error: no checkpoint in {tmp_path}/checkpoints\n")

    def body(config):  # a missing file met outside jaxtrain's code is a failure
        with open(tmp_path / "absent.json"):
            pass

    status, err = _run(body, capsys)
    assert status == 1 and "Traceback" in err


def test_exit_status_attribute(capsys):
    class Diverged(RuntimeError):
        exit_status = 3

    def body(config):
        raise Diverged("loss is nan at step 7")

    assert _run(body, capsys) == (3, "error: loss is nan at step 7\n")


def test_a_collective_whose_peer_ended_is_one_line(capsys):
    """Another process of a multi-process run ended (its own output says why): the
    collective that found out fails with one line and status 1, not a traceback."""
    gone = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
            "Connection closed by peer [127.0.0.1]:40364")

    def body(config):
        raise ValueError(gone)  # what jax raised in process_allgather (jaxlib 0.10.2)

    line = (f"error: another process of this run ended ({gone}); its own output says why; "
            "rerun the same command on every process to resume\n")
    assert _run(body, capsys) == (1, line)
    assert not cli.peer_gone(ValueError("Connection closed by peer"))  # not a collective's


def test_ctrl_c_while_the_experiment_imports_exits_130_in_one_line(tmp_path):
    """JAX's import takes seconds; a Ctrl-C in it was lost (the run trained to the end,
    exit 0) or ended in a traceback. Held until cli.run starts, it exits 130 at once."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (tests started in the background: cmd &), and a "
                    "child ignores it too, as a background job must")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.digits_mlp", "--workdir", str(tmp_path / "run"),
         "--progress", "none"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # importing jax (the run itself starts seconds later)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "error: interrupted\n")
    assert not (tmp_path / "run").exists()


def test_interrupt_and_exit_codes(capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    assert _run(interrupted, capsys) == (130, "error: interrupted\n")
    assert _run(lambda c: sys.exit(4), capsys) == (4, "")
    assert _run(lambda c: None, capsys) == (0, "")
    assert cli.exit_status(ConfigError("x")) == 2
    assert cli.exit_status(RuntimeError("x")) is None


def test_deterministic_mode_in_process(capsys):
    """The backend is up in tests: XLA_FLAGS stays as it is, matmul precision is scoped."""
    import jax

    seen = {}

    def body(config):
        seen["precision"] = jax.config.jax_default_matmul_precision
        seen["deterministic"] = config.deterministic

    flags = os.environ.get("XLA_FLAGS")
    assert _run(body, capsys, ["--deterministic"]) == (0, "")  # CPU: no warning
    assert seen == {"precision": "highest", "deterministic": True}
    assert jax.config.jax_default_matmul_precision is None
    assert os.environ.get("XLA_FLAGS") == flags


def test_deterministic_flag_set_before_the_backend_starts():
    """In a fresh process the flag reaches XLA_FLAGS before JAX starts its backend,
    and this jaxlib accepts it (an unknown XLA flag aborts the process)."""
    script = (
        "import os, jax\n"
        "from jaxtrain.cli import deterministic_mode\n"
        "with deterministic_mode(True):\n"
        "    print(os.environ['XLA_FLAGS'])\n"
        "    print(float(jax.numpy.ones((4, 4)).sum()), jax.config.jax_default_matmul_precision)\n"
    )
    proc = _python("-c", script)
    assert proc.returncode == 0, proc.stderr
    flags, result = proc.stdout.splitlines()
    assert "--xla_gpu_deterministic_ops=true" in flags.split()
    assert "--xla_force_host_platform_device_count=8" in flags.split()
    assert result == "16.0 highest"


# ----------------------------------------------------------------------------- the doc


def test_doc_table_matches_the_cases():
    """docs/BAD_INPUTS.md lists every case here, with the same message, and no others."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert sorted(rows) == sorted(c.id for c in BAD)
    for case in BAD:
        assert all(part in rows[case.id].replace("\\|", "|") for part in case.parts), case.id
    assert len(rows) >= 15
