"""Writers: JSONL is the source of truth, TensorBoard event files read back equal it,
optional backends are imported only when asked for."""

import io
import json
import math
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxtrain import writers as W
from jaxtrain.config import TrainConfig

RECORDS = [
    (1, "train", {"loss": 2.5, "accuracy": 0.125}),
    (2, "train", {"loss": 1.75, "accuracy": 0.5}),
    (2, "val", {"loss": 1.5, "accuracy": 0.625}),
    (3, "train", {"loss": float("nan"), "accuracy": 0.0}),
]


def _write_all(w):
    for step, split, m in RECORDS:
        w.write(step, split, m)
    w.close()


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    _write_all(W.JsonlWriter(str(path)))
    got = W.read_jsonl(str(path))
    assert [(r["step"], r["split"]) for r in got] == [(s, p) for s, p, _ in RECORDS]
    assert got[1] == {"step": 2, "split": "train", "loss": 1.75, "accuracy": 0.5}
    assert got[3]["loss"] == "nan"  # JSON has no NaN: stored as its repr


def test_jsonl_keeps_a_seed_an_integer(tmp_path):
    w = W.JsonlWriter(str(tmp_path / "metrics.jsonl"))
    w.write(5, "test", {"seed": 3, "accuracy": 0.75})
    w.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert line == '{"step": 5, "split": "test", "seed": 3, "accuracy": 0.75}'


@pytest.mark.needs("tensorboardX")
def test_tensorboard_event_files_read_back(tmp_path):
    logdir = str(tmp_path / "tb")
    _write_all(W.TensorBoardWriter(logdir, config={"lr": 0.1}))
    scalars = W.read_tensorboard(logdir)
    got = {(s.step, s.tag): s.value for s in scalars}
    want = {(st, f"{sp}/{k}"): v for st, sp, m in RECORDS for k, v in m.items()}
    assert got.keys() == want.keys()
    for key, v in want.items():
        if math.isnan(v):
            assert math.isnan(got[key])
        else:  # simple_value is float32; these values are exact in float32
            assert got[key] == v, key
    assert [s.step for s in scalars] == sorted(s.step for s in scalars)


@pytest.mark.needs("tensorboardX")
def test_tensorboard_seed_runs_get_one_tag_per_seed(tmp_path):
    w = W.TensorBoardWriter(str(tmp_path))
    w.write(5, "val", {"seed": 3, "accuracy": 0.75})
    w.write(5, "val", {"seed": 4, "accuracy": 0.5})
    w.close()
    got = {s.tag: s.value for s in W.read_tensorboard(str(tmp_path))}
    assert got == {"val/accuracy/seed_3": 0.75, "val/accuracy/seed_4": 0.5}


@pytest.mark.needs("tensorboardX")
def test_tensorboard_reader_checks_crc(tmp_path):
    _write_all(W.TensorBoardWriter(str(tmp_path)))
    (path,) = list(tmp_path.iterdir())
    raw = bytearray(path.read_bytes())
    # Flip one byte inside the payload of the second record.
    (first_len,) = struct.unpack("<Q", raw[:8])
    second = 8 + 4 + first_len + 4
    raw[second + 12 + 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        W.read_tensorboard(str(tmp_path))


@pytest.mark.needs("tensorboardX")
def test_tensorboard_reader_tolerates_truncated_tail(tmp_path):
    _write_all(W.TensorBoardWriter(str(tmp_path)))
    (path,) = list(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:-3])  # a writer killed mid-record
    got = W.read_tensorboard(str(tmp_path))
    assert len(got) == sum(len(m) for _, _, m in RECORDS) - 1


@pytest.mark.needs("tensorboardX")
def test_tensorboard_purge_step_hides_steps_rewritten_by_a_resumed_run(tmp_path):
    first = W.TensorBoardWriter(str(tmp_path))
    for step in range(1, 6):
        first.write(step, "train", {"loss": float(step)})
    first.close()
    resumed = W.TensorBoardWriter(str(tmp_path), purge_step=3)  # same second: a new file
    for step in (3, 4):
        resumed.write(step, "train", {"loss": 10.0 * step})
    resumed.close()
    assert len(os.listdir(tmp_path)) == 2
    got = [(s.step, s.value) for s in W.read_tensorboard(str(tmp_path))]
    assert got == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.mark.needs("tensorboardX")
def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX tries ``import torch`` at import; the writer keeps it from doing so
    (seconds and ~190 MB where PyTorch is installed). A stand-in ``torch`` package
    first on the path shows whether it was imported, and that it still is afterwards."""
    fake = tmp_path / "path" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("STAND_IN = True\nclass Tensor: pass\n")
    script = (
        "import sys\n"
        "from jaxtrain import writers as W\n"
        "w = W.TensorBoardWriter(sys.argv[1]); w.write(1, 'train', {'loss': 1.5}); w.close()\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(getattr(torch, 'STAND_IN', False), [s.value for s in W.read_tensorboard(sys.argv[1])])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "path")}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tb")], env=env, check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False", "True [1.5]"]


def test_log_writer_lines():
    buf = io.StringIO()
    w = W.ConsoleWriter(buf)
    w.write(7, "val", {"loss": 0.123456, "accuracy": 0.9})
    assert buf.getvalue() == "step 7 val: loss=0.1235 accuracy=0.9\n"


@pytest.mark.needs("tensorboardX")
def test_create_writers_default_is_jsonl_plus_tensorboard(tmp_path):
    ws = W.create_writers(TrainConfig(), str(tmp_path))
    assert [type(w) for w in ws] == [W.JsonlWriter, W.TensorBoardWriter]
    out = W.MultiWriter(ws)
    out.write(1, "train", {"loss": 0.5})
    out.close()
    assert W.read_jsonl(str(tmp_path / "metrics.jsonl")) == [
        {"step": 1, "split": "train", "loss": 0.5}]
    assert [(s.tag, s.value) for s in W.read_tensorboard(str(tmp_path / "tensorboard"))] == [
        ("train/loss", 0.5)]
    no_tb = W.create_writers(TrainConfig(tensorboard=False), str(tmp_path / "b"))
    assert [type(w) for w in no_tb] == [W.JsonlWriter]
    no_tb[0].close()


@pytest.mark.parametrize("module, field", [("wandb", "wandb_project"),
                                           ("mlflow", "mlflow_experiment")])
def test_missing_optional_package_is_one_line_error(tmp_path, monkeypatch, module, field):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    config = TrainConfig(**{field: "proj"})
    with pytest.raises(W.WriterError) as e:
        W.create_writers(config, str(tmp_path))
    assert isinstance(e.value, ValueError)  # the CLI maps it to exit status 2
    flag = "--" + field.replace("_", "-")
    assert str(e.value) == f"{flag} needs the {module} package: pip install {module}"
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before opening any file


@pytest.mark.parametrize("flag, module", [("--wandb-project", "wandb"),
                                          ("--mlflow-experiment", "mlflow")])
def test_cli_with_missing_backend_exits_2_before_writing(tmp_path, monkeypatch, capsys, flag,
                                                         module):
    from experiments import digits_mlp

    monkeypatch.setitem(sys.modules, module, None)
    workdir = tmp_path / "run"
    assert digits_mlp.main(["--workdir", str(workdir), flag, "proj"]) == 2
    want = f"error: {flag} needs the {module} package: pip install {module}\n"
    assert capsys.readouterr().err == want
    assert not workdir.exists()


def test_missing_tensorboardx_only_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    ws = W.create_writers(TrainConfig(), str(tmp_path))
    assert [type(w) for w in ws] == [W.JsonlWriter]
    ws[0].close()
    assert capsys.readouterr().err.startswith("warning: tensorboardX is not installed")


def test_optional_packages_not_imported_unless_asked(tmp_path):
    ws = W.create_writers(TrainConfig(), str(tmp_path))
    for w in ws:
        w.close()
    assert "wandb" not in sys.modules and "mlflow" not in sys.modules


def test_wandb_and_mlflow_writers_with_fake_modules(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("wandb.log", data, step))

        def finish(self):
            calls.append(("wandb.finish",))

    fake_wandb = types.SimpleNamespace(
        init=lambda **kw: calls.append(("wandb.init", kw["project"], kw["config"]["lr"])) or Run())
    fake_mlflow = types.SimpleNamespace(
        set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
        log_params=lambda p: calls.append(("mlflow.params", p["lr"], p["synthetic_shape"])),
        log_metrics=lambda m, step: calls.append(("mlflow.log", m, step)),
        end_run=lambda: calls.append(("mlflow.end",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)
    config = TrainConfig(lr=0.25, wandb_project="p", mlflow_experiment="e", tensorboard=False)
    out = W.MultiWriter(W.create_writers(config, str(tmp_path / "run1")))
    out.write(4, "val", {"seed": 1, "loss": 0.5})
    out.close()
    assert calls == [
        ("wandb.init", "p", 0.25),
        ("mlflow.experiment", "e"),
        ("mlflow.start", "run1"),
        ("mlflow.params", 0.25, "[28, 28, 1]"),
        ("wandb.log", {"val/loss/seed_1": 0.5}, 4),
        ("mlflow.log", {"val/loss/seed_1": 0.5}, 4),
        ("wandb.finish",),
        ("mlflow.end",),
    ]


def test_write_json_is_strict_and_atomic(tmp_path):
    path = str(tmp_path / "summary.json")
    W.write_json(path, {"a": float("nan"), "b": [np.float32(0.5), np.inf], "c": np.arange(2),
                        "d": np.bool_(True), "e": None})
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [0.5, None], "c": [0, 1], "d": True, "e": None}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no .tmp left


def test_metrics_files_that_cannot_be_written_are_one_line_errors(tmp_path, monkeypatch):
    """A metrics.jsonl the run cannot append to, or cut back on resume, is a WriterError
    (exit 2, one line) naming the file, not an OSError traceback; the file stays as it was."""
    from jaxtrain.resume import drop_records_after
    from jaxtrain.writers import JsonlWriter, WriterError

    blocked = tmp_path / "metrics.jsonl"
    blocked.mkdir()  # stands for a file left read-only or immutable (root ignores modes)
    with pytest.raises(WriterError, match=r"^cannot write .*metrics.jsonl: Is a directory$"):
        JsonlWriter(str(blocked))

    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    lines = ['{"step": 5, "split": "train"}\n', '{"step": 9, "split": "train"}\n']
    path.write_text("".join(lines))

    def refuse(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriterError, match=r"cannot write .*metrics.jsonl: Operation not permitted"):
        drop_records_after(str(path), 6)
    assert path.read_text() == "".join(lines)
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no .tmp left
    monkeypatch.undo()
    drop_records_after(str(path), 6)
    assert path.read_text() == lines[0]
