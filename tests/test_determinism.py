"""Same seed, same device count, same versions: identical metrics.jsonl and params.

What may change results is listed in docs/BAD_INPUTS.md ("Determinism"); the
device count is one, shown here as the control that proves the comparison can
tell runs apart.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import digits_mlp
from jaxtrain.checkpoint import load_params
from jaxtrain.writers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("--epochs", "2", "--seed", "3", "--progress", "none", "--compilation-cache", "",
        "--eval-every", "10", "--log-every", "5")
TIMING = re.compile(r"time|sec|wall|throughput", re.IGNORECASE)


def _records(workdir: Path) -> list[dict]:
    """metrics.jsonl without timing fields (none today; a future one must not break this)."""
    return [{k: v for k, v in r.items() if not TIMING.search(k)}
            for r in read_jsonl(str(workdir / "metrics.jsonl"))]


def _run(workdir: Path, *extra: str) -> tuple[list[dict], dict]:
    assert digits_mlp.main([*ARGS, *extra, "--workdir", str(workdir)]) == 0
    return _records(workdir), load_params(str(workdir))


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_same_seed_same_devices_is_bitwise_identical(tmp_path):
    records, params = _run(tmp_path / "a")
    again, params_again = _run(tmp_path / "b", "--deterministic")

    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert len([r for r in records if r["split"] == "train"]) >= 8
    # Same seed and device count (8 fake CPUs): identical, --deterministic or not (on CPU).
    assert again == records
    assert _leaves_equal(params_again, params)
    manifest = json.loads((tmp_path / "b" / "config.json").read_text())
    assert manifest["config"]["deterministic"] is True
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["deterministic"] is False
    # The comparison sees one float32 ulp.
    bumped = [dict(r) for r in records]
    bumped[0]["loss"] = float(np.nextafter(np.float32(bumped[0]["loss"]), np.float32(1e9)))
    assert bumped != records


@pytest.mark.slow
def test_device_count_changes_only_the_last_bits(tmp_path):
    """One device instead of 8 reorders float sums: not bitwise equal (documented),
    but equal to float32 rounding."""
    records, params = _run(tmp_path / "eight")
    fewer, params_fewer = _run(tmp_path / "one", "--devices", "1")
    assert fewer != records
    assert not _leaves_equal(params_fewer, params)
    for x, y in zip(jax.tree.leaves(params_fewer), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * float(np.max(np.abs(y))))
    for r, s in zip(fewer, records, strict=True):
        assert (r["step"], r["split"]) == (s["step"], s["split"])
        np.testing.assert_allclose(r["loss"], s["loss"], rtol=1e-4)


@pytest.mark.slow
def test_fresh_processes_are_identical(tmp_path):
    """Two fresh interpreters (no in-memory compile caches) give the same bits."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = []
    for name in ("p", "q"):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.digits_mlp", *ARGS,
             "--workdir", str(tmp_path / name)],
            check=False, cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        out.append((_records(tmp_path / name), load_params(str(tmp_path / name))))
    assert out[0][0] == out[1][0]
    assert _leaves_equal(out[0][1], out[1][1])
