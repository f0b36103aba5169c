"""TrainConfig.validate(), the flag parser and the read-only checks run before a run writes."""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import data as data_lib
from jaxtrain.config import (
    ConfigError,
    TrainConfig,
    build_parser,
    check_model_input,
    check_paths,
    check_writable_dir,
    parse_config,
)
from jaxtrain.models import create_model

GOOD = TrainConfig()


def test_defaults_are_valid():
    from experiments import digits_mlp

    assert GOOD.validate() is GOOD
    assert digits_mlp.DEFAULTS.validate() is digits_mlp.DEFAULTS


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_field_is_type_checked(field):
    """A value of no field's type (here ``object()``) is refused, naming the flag."""
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag} must be "):
        GOOD.replace(**{field: object()}).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 64.0}, "--batch-size must be an integer, got 64.0"),
        ({"batch_size": True}, "--batch-size must be an integer, got True"),
        ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
        ({"flip": 1}, "--flip must be true or false, got 1"),
        ({"parallel": "gpu"}, "--parallel must be one of ['auto', 'none', 'pmap', 'mesh']"),
        ({"synthetic_shape": [8, 8, 1]}, "--synthetic-shape must be a tuple of integers"),
        ({"synthetic_shape": (8, 8.0, 1)}, "--synthetic-shape must be a tuple of integers"),
        ({"data_dir": 3}, "--data-dir must be a string or None, got 3"),
    ],
)
def test_wrong_types(changes, message):
    with pytest.raises(ConfigError) as e:
        GOOD.replace(**changes).validate()
    assert str(e.value).startswith(message)


def test_numeric_types_that_fit_are_accepted():
    GOOD.replace(lr=1, batch_size=np.int64(64), data_dir="/tmp", num_processes=None).validate()


# ----------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 0}, "--batch-size must be > 0, got 0"),
        ({"batch_size": -8}, "--batch-size must be > 0, got -8"),
        ({"eval_batch_size": 0}, "--eval-batch-size must be > 0"),
        ({"epochs": 0}, "--epochs must be > 0"),
        ({"num_seeds": 0}, "--num-seeds must be > 0"),
        ({"synthetic_size": 0}, "--synthetic-size must be > 0"),
        ({"log_every": 0}, "--log-every must be > 0"),
        ({"max_skipped": 0}, "--max-skipped must be > 0"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints must be > 0"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0"),
        ({"eval_every": -1}, "--eval-every must be >= 0"),
        ({"warmup_steps": -1}, "--warmup-steps must be >= 0"),
        ({"crop_padding": -1}, "--crop-padding must be >= 0"),
        ({"devices": -1}, "--devices must be >= 0"),
        ({"weight_decay": -1e-4}, "--weight-decay must be finite and >= 0"),
        ({"weight_decay": math.inf}, "--weight-decay must be finite and >= 0, got inf"),
        ({"clip_norm": math.nan}, "--clip-norm must be finite and >= 0, got nan"),
        ({"lr": 0.0}, "--lr must be finite and > 0, got 0.0"),
        ({"lr": -1e-3}, "--lr must be finite and > 0"),
        ({"lr": math.nan}, "--lr must be finite and > 0, got nan"),
        ({"lr": math.inf}, "--lr must be finite and > 0, got inf"),
        ({"dropout": 1.0}, "--dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "--dropout must be in [0, 1)"),
        ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
        ({"momentum": math.nan}, "--momentum must be in [0, 1), got nan"),
        ({"val_fraction": 1.0}, "--val-fraction must be in [0, 1)"),
        ({"seed": -1}, "--seed must be in [0, 2**32), got -1"),
        ({"seed": 2**32}, "--seed must be in [0, 2**32), got 4294967296"),
        ({"seed": 2**32 - 2, "num_seeds": 3}, "--seed 4294967294 + --num-seeds 3 runs past"),
        ({"model": "resnet"}, "unknown --model 'resnet'; choose one of ['cnn', 'mlp',"),
        ({"optimizer": "adagrad"}, "unknown --optimizer 'adagrad'; choose one of ['sgd'"),
        ({"schedule": "linear"}, "unknown --schedule 'linear'; choose one of ['constant'"),
        ({"dataset": "Digits"}, "unknown --dataset 'Digits'; choose digits, synthetic or a TFDS"),
        ({"dataset": ""}, "unknown --dataset ''"),
        ({"dataset": "mnist test"}, "unknown --dataset 'mnist test'"),
        ({"synthetic_shape": (8, 8)}, "--synthetic-shape must be H,W,C > 0, got (8, 8)"),
        ({"synthetic_shape": (8, 0, 1)}, "--synthetic-shape must be H,W,C > 0"),
        ({"synthetic_classes": 1}, "--synthetic-classes must be >= 2, got 1"),
        ({"workdir": " "}, "--workdir must not be empty"),
        ({"coordinator_address": "localhost"}, "--coordinator-address must be HOST:PORT"),
        ({"coordinator_address": "host:0"}, "--coordinator-address must be HOST:PORT"),
        ({"coordinator_address": ":1234"}, "--coordinator-address must be HOST:PORT"),
        ({"num_processes": 0}, "--num-processes must be >= 1, got 0"),
        ({"process_id": -1}, "--process-id must be >= 0"),
        ({"num_processes": 2, "process_id": 2}, "--process-id 2 must be < --num-processes 2"),
    ],
)
def test_out_of_range(changes, message):
    with pytest.raises(ConfigError) as e:
        GOOD.replace(**changes).validate()
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"dataset": "synthetic"},
        {"dataset": "mnist"},
        {"dataset": "mnist:3.0.1"},
        {"dataset": "cifar10_corrupted/gaussian_noise_1"},
        {"dataset": "cifar10:3.*.*"},
        {"seed": 2**32 - 1},
        {"coordinator_address": "10.0.0.1:8476", "num_processes": 2, "process_id": 1},
        {"coordinator_address": "[::1]:8476"},
        {"val_fraction": 0.0, "dropout": 0.0, "momentum": 0.0},
    ],
)
def test_in_range(changes):
    GOOD.replace(**changes).validate()


# ----------------------------------------------------------------------------- parser


def _parse(*argv: str) -> TrainConfig:
    return parse_config(TrainConfig, GOOD, list(argv), prog="test")


def test_parse_maps_flags_to_fields():
    config = _parse(
        "--batch-size", "32", "--lr", "0.01", "--synthetic-shape", "8x8x3", "--flip",
        "--deterministic", "--data-dir", "/tmp", "--num-processes", "2",
    )
    assert (config.batch_size, config.lr, config.synthetic_shape) == (32, 0.01, (8, 8, 3))
    assert config.flip and config.deterministic and config.num_processes == 2
    assert _parse("--synthetic-shape", "4,5,1", "--no-flip").synthetic_shape == (4, 5, 1)
    assert _parse() == GOOD


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
        (["--batch-size", "1.5"], "argument --batch-size: invalid int value: '1.5'"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--synthetic-shape", "8,a,1"], "argument --synthetic-shape: invalid comma-separated int"),
        (["--parallel", "gpu"], "argument --parallel: invalid choice: 'gpu'"),
        (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
        (["--batch", "64"], "unrecognized arguments: --batch 64"),  # no abbreviations
        (["--epochs"], "argument --epochs: expected one argument"),
        (["--lr", "nan"], "--lr must be finite and > 0, got nan"),  # parsed, then validated
        (["extra"], "unrecognized arguments: extra"),
    ],
)
def test_parse_errors_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        _parse(*argv)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        _parse("--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in out, flag
        if not isinstance(field.default, bool):
            default = field.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            assert f"(default: {shown})" in out, field.name


def test_parser_covers_subclass_fields():
    @dataclasses.dataclass(frozen=True)
    class Sub(TrainConfig):
        widths: tuple[int, ...] = (64, 64)
        mode: str = "a"

    parser = build_parser(Sub, Sub(), "sub")
    ns = parser.parse_args(["--widths", "8,16", "--mode", "b"])
    assert Sub(**vars(ns)).validate().widths == (8, 16)
    with pytest.raises(ConfigError, match="^--widths must be a tuple of integers"):
        Sub(widths=("8",)).validate()


# ----------------------------------------------------------------------------- paths


def _tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), path)
                  for d, dirs, files in os.walk(path) for n in dirs + files)


def test_writable_dir_probe_creates_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.txt").write_text("x")
    before = _tree(tmp_path)
    check_writable_dir(str(tmp_path / "run"), "--workdir")  # exists
    check_writable_dir(str(tmp_path / "new" / "deeper"), "--workdir")  # would be created
    assert _tree(tmp_path) == before


def test_writable_dir_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    cases = {
        str(tmp_path / "file"): "is a file, not a directory",
        str(tmp_path / "file" / "sub"): f"cannot be created: {tmp_path / 'file'} is not a directory",
        str(tmp_path / "dangling"): "is a broken symbolic link",
        "/proc/jaxtrain-test/run": "is not writable",  # refused even to root
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match="^--workdir ") as e:
            check_writable_dir(path, "--workdir")
        assert message in str(e.value), (path, str(e.value))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_writable_dir_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_writable_dir(str(locked / "run"), "--workdir")
    finally:
        locked.chmod(0o700)


def test_check_paths(tmp_path):
    config = GOOD.replace(workdir=str(tmp_path / "run"), compilation_cache="")
    check_paths(config)
    with pytest.raises(ConfigError, match=r"^--compilation-cache .*\(pass --compilation-cache ''"):
        check_paths(config.replace(compilation_cache="/proc/jaxtrain-cache"))
    with pytest.raises(ConfigError, match="^--data-dir /nonexistent/tfds is not a directory"):
        check_paths(config.replace(dataset="mnist", data_dir="/nonexistent/tfds"))
    check_paths(config.replace(data_dir="/nonexistent/tfds"))  # digits ignores --data-dir
    check_paths(config.replace(workdir="ignored"), workdir=str(tmp_path / "other"))


# ----------------------------------------------------------------------------- model input


class _NeedsLargeImages(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.shape[1] < 16:
            raise ValueError(f"needs at least 16 px, got {x.shape[1]}\nsecond line")
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class _WrongHead(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_tiny"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (1, 1, 3), (5, 7, 2)])
def test_registry_models_accept_any_positive_image_shape(name, shape):
    """Measured: SAME padding lets every model take images down to 1x1 px."""
    check_model_input(create_model(name, 10), shape, 10, name)


def test_model_input_refusals():
    with pytest.raises(ConfigError) as e:
        check_model_input(_NeedsLargeImages(10), (8, 8, 1), 10, "big")
    assert str(e.value) == (
        "--model big cannot take 8x8x1 images of this dataset "
        "(ValueError: needs at least 16 px, got 8)"
    )
    check_model_input(_NeedsLargeImages(10), (16, 16, 1), 10, "big")
    with pytest.raises(ConfigError, match=r"gives logits \(2, 3\) .* expected \(2, 10\)"):
        check_model_input(_WrongHead(), (8, 8, 1), 10, "wrong")
    with pytest.raises(ConfigError, match="cannot take 8x8x0 images"):
        check_model_input(create_model("mlp", 10), (8, 8, 0), 10, "mlp")


# ----------------------------------------------------------------------------- data


def _split(n=6, shape=(4, 4, 1), num_classes=3):
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(0, 1, (n, *shape)).astype(np.float32),
        "label": (np.arange(n) % num_classes).astype(np.int32),
    }


def test_check_split_accepts_good_data():
    data_lib.check_split(_split(), 3)
    data_lib.check_split({"image": np.zeros((0, 2, 2, 1), np.float32),
                          "label": np.zeros(0, np.int32)}, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {**s, "label": s["label"] + 1}, "labels must be in [0, 3), found 1..3"),
        (lambda s: {**s, "label": s["label"] - 1}, "labels must be in [0, 3), found -1..1"),
        (lambda s: {**s, "image": s["image"] * 255}, "pixel values must be in [0, 1], found"),
        (lambda s: {**s, "image": np.where(s["image"] > 0.5, np.nan, s["image"])},
         "non-finite pixel values"),
        (lambda s: {**s, "image": s["image"][..., 0]}, "images have shape (6, 4, 4), expected"),
        (lambda s: {**s, "label": s["label"][:3]}, "labels have shape (3,), expected [6]"),
        (lambda s: {**s, "label": s["label"].astype(np.float32)}, "integer labels, got float32"),
        (lambda s: {**s, "image": (s["image"] * 255).astype(np.uint8)}, "float images"),
    ],
)
def test_check_split_refusals(change, message):
    with pytest.raises(data_lib.DataError) as e:
        data_lib.check_split(change(_split()), 3, "dataset 'x' train split")
    assert str(e.value).startswith("dataset 'x' train split: ")
    assert message in str(e.value)


def test_load_dataset_checks_its_splits(monkeypatch):
    train, test = data_lib.load_digits()
    test = {**test, "label": np.where(np.arange(len(test["label"])) == 3, 10, test["label"])}
    monkeypatch.setattr(data_lib, "load_digits", lambda: (train, test))
    with pytest.raises(data_lib.DataError, match=r"^dataset 'digits' test split: labels must"):
        data_lib.load_dataset("digits")


def test_jnp_is_not_needed_for_the_checks():
    # check_split works on host arrays only; a device array goes through np.asarray
    data_lib.check_split({k: jnp.asarray(v) for k, v in _split().items()}, 3)
