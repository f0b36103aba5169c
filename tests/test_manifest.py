"""The run manifest in config.json: config, versions, XLA flags, devices, git, data fingerprint."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from jaxtrain import data as data_lib
from jaxtrain import manifest as M
from jaxtrain.config import TrainConfig
from jaxtrain.loop import train_and_evaluate
from jaxtrain.parallel import create_strategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits")


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_manifest_fields(digits):
    config = TrainConfig(dataset="digits", lr=0.25, seed=7)
    strategy = create_strategy("mesh", 4)
    m = M.build_manifest(config, strategy, digits)
    json.dumps(m)  # serializable as written
    assert m["config"] == config.to_dict()
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert m["versions"][pkg] == md.version(pkg)
    assert m["versions"]["jax"] == jax.__version__
    try:  # the GPU image runs the source tree without installing it
        installed = md.version("jaxtrain")
    except md.PackageNotFoundError:
        installed = "not installed"
    assert m["versions"]["jaxtrain"] == installed
    assert m["xla_flags"] == os.environ["XLA_FLAGS"]
    assert "xla_force_host_platform_device_count=8" in m["xla_flags"]  # set by conftest
    assert m["env"]["XLA_FLAGS"] == os.environ["XLA_FLAGS"]
    d = m["devices"]
    assert d["device_kinds"] == {jax.devices()[0].device_kind: 8}
    assert (d["global_device_count"], d["local_device_count"]) == (8, 8)
    assert (d["num_processes"], d["process_index"]) == (1, 0)
    assert (d["strategy"], d["num_devices"], d["backend"]) == ("mesh", 4, "cpu")
    assert m["host"]["hostname"] and m["created"].endswith("+00:00")


def _is_recent_commit(commit: str) -> bool:
    """``commit`` is HEAD or an ancestor (others may commit to this checkout meanwhile)."""
    done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO,
                          check=False)
    return len(commit) == 40 and done.returncode == 0


def test_git_commit_and_dirty_flag_of_this_checkout():
    before = _git("rev-parse", "HEAD", cwd=REPO)
    g = M.build_manifest(TrainConfig())["git"]
    assert g["root"] == _git("rev-parse", "--show-toplevel", cwd=REPO)
    assert g["commit"] in (before, _git("rev-parse", "HEAD", cwd=REPO))
    assert isinstance(g["dirty"], bool)


def test_git_info_in_a_fresh_repo(tmp_path):
    assert M.git_info(str(tmp_path)) is None  # not a checkout
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True,
                                    capture_output=True)
    run("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    run("add", "f.py")
    run("commit", "-q", "-m", "x")
    info = M.git_info(str(tmp_path))
    assert info["commit"] == _git("rev-parse", "HEAD", cwd=tmp_path) and info["dirty"] is False
    (tmp_path / "untracked.txt").write_text("run output")
    assert M.git_info(str(tmp_path))["dirty"] is False  # untracked files do not count
    (tmp_path / "f.py").write_text("a = 2\n")
    assert M.git_info(str(tmp_path))["dirty"] is True


def test_data_fingerprint(digits):
    fp = M.data_fingerprint(digits)
    assert fp["source"] == "sklearn.datasets.load_digits (embedded)"
    assert fp["sizes"] == {"train": 1294, "val": 144, "test": 359}  # 1797 = 80/20, then 10% val
    assert fp["num_classes"] == 10 and fp["image_shape"] == [8, 8, 1]
    assert fp["fingerprint"] == M.data_fingerprint(data_lib.load_dataset("digits"))["fingerprint"]
    assert len(set(fp["fingerprint"].values())) == 3
    assert fp["fingerprint_examples"] == "all"
    # one pixel or one label anywhere in the split changes the hash (the last example too)
    for key, where in (("image", (0, 3, 3, 0)), ("image", (-1, 3, 3, 0)), ("label", (-1,))):
        changed = {k: v.copy() for k, v in digits.train.items()}
        changed[key][where] += 1
        assert M.split_fingerprint(changed) != fp["fingerprint"]["train"], (key, where)
    # with n, only the first n examples count
    later = {k: v.copy() for k, v in digits.train.items()}
    later["label"][-1] += 1
    assert M.split_fingerprint(later, n=256) == M.split_fingerprint(digits.train, n=256)
    synth = data_lib.load_dataset("synthetic", synthetic_size=200, synthetic_shape=(4, 4, 1))
    assert M.data_fingerprint(synth)["source"].startswith("synthetic")


def test_env_excludes_credentials(monkeypatch):
    monkeypatch.setenv("JAX_TRACEBACK_FILTERING", "off")
    monkeypatch.setenv("JAX_FAKE_API_TOKEN", "secret")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("HOME_SECRET", "x")
    env = M.run_env()
    assert env["JAX_TRACEBACK_FILTERING"] == "off" and env["NCCL_DEBUG"] == "INFO"
    assert "JAX_FAKE_API_TOKEN" not in env and "HOME_SECRET" not in env


def test_config_json_written_by_a_run(tmp_path, digits):
    workdir = tmp_path / "run"
    config = TrainConfig(dataset="digits", model="mlp", epochs=1, batch_size=64,
                         progress="none", compilation_cache="", parallel="none")
    train_and_evaluate(config, str(workdir))
    m = json.loads((workdir / "config.json").read_text())
    assert m["config"]["workdir"] == str(workdir) and m["config"]["batch_size"] == 64
    assert m["devices"]["strategy"] == "none" and m["devices"]["num_devices"] == 1
    assert m["data"]["fingerprint"] == M.data_fingerprint(digits)["fingerprint"]
    assert m["data"]["resident"] is True
    assert _is_recent_commit(m["git"]["commit"])
    assert set(m) >= {"config", "versions", "xla_flags", "env", "devices", "git", "data",
                      "host", "created", "matmul_precision"}
    assert np.isfinite(json.loads((workdir / "summary.json").read_text())["test_accuracy"])
