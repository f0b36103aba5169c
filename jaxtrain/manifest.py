"""The run manifest written to ``config.json``: what ran, on what, with what data.

``build_manifest`` returns a JSON-serializable dict:

- ``config``: the resolved config (every field);
- ``versions``: jaxtrain, jax, jaxlib, flax, optax, orbax-checkpoint, numpy,
  python (and installed accelerator plugins);
- ``xla_flags``, ``matmul_precision`` and ``env``: ``XLA_FLAGS``, JAX's default
  matmul precision, and the ``JAX_*`` / ``XLA_*`` /
  ``NCCL_*`` / ``CUDA_VISIBLE_DEVICES`` / ``SLURM_*`` job variables that change
  how a run executes;
- ``devices``: backend, device kinds with counts (all processes), devices used,
  strategy, process count and index;
- ``git``: commit and dirty flag of the checkout holding the jaxtrain code
  (``None`` when it is not a git checkout), and of the working directory when
  that is another checkout;
- ``data``: a fingerprint (``data_fingerprint``);
- ``host`` and ``created``: hostname, platform, UTC time.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from typing import Any

import jax
import numpy as np

PACKAGES = ("jaxtrain", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
OPTIONAL_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                     "jax-cuda13-pjrt", "libtpu", "tensorflow-datasets", "tensorboardX")
ENV_PREFIXES = ("XLA_", "JAX_", "NCCL_", "TPU_", "LIBTPU_", "SLURM_JOB_ID", "SLURM_NNODES",
                "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def versions() -> dict[str, str]:
    """Versions of the packages that decide what a run computes."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    for pkg in OPTIONAL_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


def run_env() -> dict[str, str]:
    """Environment variables that change how JAX/XLA execute (never credentials)."""
    return {
        k: v for k, v in sorted(os.environ.items())
        if k.startswith(ENV_PREFIXES) and not any(w in k.upper() for w in _SECRET_WORDS)
    }


def device_info(strategy: Any = None) -> dict[str, Any]:
    """Backend, device kinds and counts over all processes, and what the run uses."""
    devices = jax.devices()
    kinds = collections.Counter(d.device_kind for d in devices)
    info: dict[str, Any] = {
        "backend": jax.default_backend(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_kinds": dict(kinds),
        "global_device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "num_processes": jax.process_count(),
        "process_index": jax.process_index(),
    }
    if strategy is not None:
        info["strategy"] = strategy.kind
        info["num_devices"] = strategy.num_devices
        info["device_kind"] = strategy.devices[0].device_kind
    return info


def _git(args: list[str], cwd: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(path: str) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` of the checkout containing ``path``, else ``None``.

    ``dirty`` means tracked files differ from the commit (untracked files do
    not count: run outputs often live inside the checkout)."""
    root = _git(["rev-parse", "--show-toplevel"], path)
    if root is None:
        return None
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "root": root}


def git_manifest() -> dict[str, Any] | None:
    code = git_info(os.path.dirname(os.path.abspath(__file__)))
    cwd = git_info(os.getcwd())
    if code is None:
        return {"cwd": cwd} if cwd else None
    if cwd is not None and cwd["root"] != code["root"]:
        code = {**code, "cwd": cwd}
    return code


def split_fingerprint(split: dict[str, np.ndarray], n: int | None = None) -> str:
    """SHA-256 of every example (``n``: the first ``n``): shape, dtype and bytes of every
    array. The whole split, since a change anywhere is a different run's data (CIFAR-10's
    614 MB train images hash in ~0.4 s here; it used to be the first 256 examples, which
    missed relabelled or altered examples past them)."""
    h = hashlib.sha256()
    for key in sorted(split):
        a = np.ascontiguousarray(np.asarray(split[key])[:n])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_fingerprint(dataset: Any, config: Any = None, n: int | None = None) -> dict[str, Any]:
    """Where the data came from and a hash of each split (its first ``n`` examples when
    ``n`` is given), so two runs can be checked to have seen the same data."""
    name = dataset.name
    if name == "digits":
        source = "sklearn.datasets.load_digits (embedded)"
    elif name == "synthetic":
        source = "synthetic (jaxtrain.data.load_synthetic, seed 0)"
    else:
        data_dir = getattr(config, "data_dir", None) if config is not None else None
        source = f"tfds:{name}" + (f" ({data_dir})" if data_dir else "")
    splits = ("train", "val", "test")
    return {
        "name": name,
        "source": source,
        "num_classes": int(dataset.num_classes),
        "image_shape": list(dataset.image_shape),
        "mean": [float(m) for m in dataset.mean],
        "std": [float(s) for s in dataset.std],
        "sizes": {s: len(getattr(dataset, s)["label"]) for s in splits},
        "fingerprint_examples": "all" if n is None else n,
        "fingerprint": {s: split_fingerprint(getattr(dataset, s), n) for s in splits},
    }


def build_manifest(config: Any, strategy: Any = None, dataset: Any = None) -> dict[str, Any]:
    """The ``config.json`` contents for a run (see the module docstring)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    manifest: dict[str, Any] = {
        "config": cfg,
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "env": run_env(),
        "devices": device_info(strategy),
        "git": git_manifest(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "python": sys.version.split()[0]},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if dataset is not None:
        manifest["data"] = data_fingerprint(dataset, config)
    return manifest
