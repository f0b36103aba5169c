"""The TFDS path (``tfds.data_source``) under ``tfds.testing.mock_data``, and the
one-line error for a dataset that is not prepared on a machine without network."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxtrain import data

tfds = pytest.importorskip("tensorflow_datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def mock(num_examples):
    # USE_CODE: random examples from the dataset's feature spec, no metadata files.
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_load_dataset_through_tfds_data_source(name, monkeypatch):
    calls = []
    real = tfds.data_source

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    with mock(40):
        ds = data.load_dataset(name, val_fraction=0.25)
    assert len(calls) == 1 and calls[0][1].get("download") is False  # never downloads
    assert ds.name == name and ds.num_classes == 10  # from the ClassLabel metadata
    assert ds.image_shape == SHAPES[name]
    assert {s: len(getattr(ds, s)["label"]) for s in ("train", "val", "test")} == {
        "train": 30, "val": 10, "test": 40,
    }
    for split in (ds.train, ds.val, ds.test):
        assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
        assert split["image"].min() >= 0.0 and split["image"].max() <= 1.0
        assert split["image"].max() > 0.5  # uint8 scaled by 1/255, not left at 0..255/255**2
    assert len(ds.mean) == len(ds.std) == SHAPES[name][-1]
    np.testing.assert_allclose(ds.mean, ds.train["image"].mean((0, 1, 2)), rtol=1e-5)


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


TINY = ["--epochs", "1", "--batch-size", "8", "--eval-batch-size", "16", "--parallel", "none",
        "--compilation-cache", "", "--progress", "none", "--no-tensorboard", "--best-metric", ""]


def test_mnist_cnn_experiment_trains_one_short_epoch(tmp_path):
    from experiments import mnist_cnn

    assert mnist_cnn.DEFAULTS.dataset == "mnist" and mnist_cnn.DEFAULTS.model == "cnn"
    with mock(48):
        code = mnist_cnn.main([*TINY, "--workdir", str(tmp_path)])
    assert code == 0
    s = _summary(tmp_path)
    assert s["steps"] == 43 // 8 and 0.0 <= s["test_accuracy"] <= 1.0
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["data"]["image_shape"] == [28, 28, 1] and cfg["data"]["sizes"]["test"] == 48


@pytest.mark.parametrize(
    "model", ["mlp", pytest.param("resnet_tiny", marks=pytest.mark.slow)]
)  # the recipe (momentum, decay, crop, flip, smoothing) on CIFAR shapes; ResNet compiles slowly
def test_cifar10_resnet_experiment_trains_one_short_epoch(tmp_path, model):
    from experiments import cifar10_resnet

    d = cifar10_resnet.DEFAULTS
    assert (d.dataset, d.model, d.optimizer, d.crop_padding, d.flip) == (
        "cifar10", "resnet18", "momentum", 4, True
    )
    with mock(40):
        code = cifar10_resnet.main([*TINY, "--model", model, "--workdir", str(tmp_path)])
    assert code == 0
    s = _summary(tmp_path)
    assert s["steps"] == 36 // 8 and np.isfinite(s["test_loss"])
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["data"]["image_shape"] == [32, 32, 3]


@pytest.mark.slow
def test_fashion_mnist_through_the_loop(tmp_path):
    from jaxtrain.config import TrainConfig
    from jaxtrain.loop import train_and_evaluate

    config = TrainConfig(dataset="fashion_mnist", model="mlp", epochs=2, batch_size=8,
                         eval_batch_size=16, parallel="none", compilation_cache="",
                         progress="none", tensorboard=False, best_metric="")
    with mock(32):
        summary = train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 2 * (29 // 8)
    with open(tmp_path / "metrics.jsonl") as f:
        splits = [json.loads(line)["split"] for line in f]
    assert splits.count("val") == 2 and splits.count("test") == 1


def test_missing_dataset_is_one_line_data_error(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "--data-dir" in msg and "tfds build mnist" in msg and "array_record" in msg
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)  # an interrupted build's empty folders
    with pytest.raises(data.DataError, match="dataset 'mnist' is not prepared in"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_missing_dataset_cli_exits_2_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    (tmp_path / "tfds").mkdir()  # an existing folder without the dataset
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist_cnn", "--data-dir", str(tmp_path / "tfds"),
         "--workdir", str(workdir), "--compilation-cache", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "--data-dir" in lines[0]
    assert "tfds build mnist" in lines[0]
    assert not (workdir / "checkpoints").exists()
