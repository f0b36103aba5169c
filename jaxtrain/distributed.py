"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from flags or the cluster.

Call :func:`initialize` once per process, before anything touches a device
(``jax.devices()``, ``jax.process_index()``, any computation). Afterwards
``jax.devices()`` lists the devices of every process and a ``mesh`` (or
``pmap``) strategy spans them all.

Where the settings come from, first match wins:

1. ``--coordinator-address HOST:PORT --num-processes N --process-id I``
   (``JAX_COORDINATOR_ADDRESS`` stands in for the first flag; a flag left out
   is taken from the cluster environment when there is one).
2. Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_RANK``;
   the coordinator is the launcher's address (``OMPI_MCA_orte_hnp_uri``,
   Open MPI <= 4) or, with Open MPI 5, ``--coordinator-address`` /
   ``JAX_COORDINATOR_ADDRESS``.
3. SLURM job steps (``srun``): ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) /
   ``SLURM_PROCID``; the coordinator is the first host of
   ``SLURM_STEP_NODELIST`` on a port derived from ``SLURM_JOB_ID``
   (``JAX_COORDINATOR_PORT`` overrides it).

Nothing found, or one process: a single-process run, nothing to initialize.

The SLURM and Open MPI rules mirror jax's own detection (same coordinator host
and port) but are resolved here rather than delegated, for two reasons found
in jax 0.10.2: jax pins every detected process to one GPU
(``local_device_ids=[SLURM_LOCALID]``) even when a node runs a single task
that should drive all its GPUs, and its Open MPI detection needs ORTE, which
Open MPI 5 no longer has. Here a process drives every visible device when it
is alone on its node, and one device (its local rank) when several tasks
share a node, unless the launcher already narrowed ``CUDA_VISIBLE_DEVICES``.

Once joined, every process watches the others (``jaxtrain.peers``): one that ends
unplanned, killed or failing alone, ends the rest at once with one line each.

Pure parsing lives in :func:`detect` (tests pass a fake environment); only
:func:`initialize` has effects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import zlib
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from jaxtrain import peers

# jax's SLURM / Open MPI convention: a port in the top 4096 of the ephemeral range.
_PORT_BASE, _PORT_SPAN = 65535 - 2**12 + 1, 2**12


class DistributedError(ValueError):
    """Multi-process settings that cannot work (message is one line)."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """One process's view of a multi-process run."""

    coordinator_address: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every device this process sees
    source: str  # "flags", "openmpi" or "slurm"


# ----------------------------------------------------------------------------- detection


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProcessGroup | None:
    """The run's process group from flags and ``environ`` (default ``os.environ``).

    Returns ``None`` for a single-process run. Raises ``DistributedError`` when
    the settings are incomplete or inconsistent.
    """
    env = os.environ if environ is None else environ
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise DistributedError(f"--process-id {process_id} with --num-processes 1 (must be 0)")
        return None  # explicitly single-process, whatever the cluster says
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None

    cluster = _openmpi(env) if "OMPI_COMM_WORLD_SIZE" in env else _slurm(env)
    flagged = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if cluster is None and not flagged:
        return None
    found = cluster or {}
    n = num_processes if num_processes is not None else found.get("num_processes")
    pid = process_id if process_id is not None else found.get("process_id")
    address = coordinator_address or found.get("coordinator_address")
    source = "flags" if flagged else found["source"]
    if n is None:
        raise DistributedError(
            "--coordinator-address / --process-id given without --num-processes "
            "(and no SLURM or Open MPI environment to take it from)"
        )
    if n == 1:
        return None
    if pid is None:
        raise DistributedError(
            f"--num-processes {n} needs --process-id (0..{n - 1}) on every process"
        )
    if not 0 <= pid < n:
        raise DistributedError(f"--process-id {pid} is outside 0..{n - 1} for {n} processes")
    if address is None:
        hint = found.get("address_hint", "")
        raise DistributedError(
            f"{n} processes need a coordinator: pass --coordinator-address HOST:PORT "
            f"(process 0's host and a free port) or set JAX_COORDINATOR_ADDRESS{hint}"
        )
    _check_address(address)
    return ProcessGroup(address, int(n), int(pid), found.get("local_device_ids"), source)


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise DistributedError(
            f"--coordinator-address {address!r} is not HOST:PORT (e.g. 10.0.0.1:12345)"
        )


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={env[name]!r} is not an integer"
        ) from None


def _port(env: Mapping[str, str], job_id: int) -> str:
    return env.get("JAX_COORDINATOR_PORT") or str(job_id % _PORT_SPAN + _PORT_BASE)


def _local_devices(
    env: Mapping[str, str], tasks_here: int, local_rank: int
) -> tuple[int, ...] | None:
    """All devices when alone on the node, else the local rank's one (unless already narrowed)."""
    if tasks_here <= 1:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and len([v for v in visible.split(",") if v.strip()]) < tasks_here:
        return None  # the launcher bound devices to tasks itself
    return (local_rank,)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-004,9],cpu1"`` -> ``"gpu003"``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise DistributedError(f"cannot read the first host of SLURM node list {nodelist!r}")
    prefix, ranges, suffix = m.groups()
    first = re.split(r"[,-]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix or ''}"


def _tasks_per_node(spec: str) -> int:
    """The most tasks on any node of a SLURM ``TASKS_PER_NODE`` list, e.g. ``"4(x2),1"`` -> 4."""
    counts = [int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", spec)]
    return max(counts, default=1)


def _slurm(env: Mapping[str, str]) -> dict | None:
    # A job step (srun) has SLURM_STEP_NODELIST; the batch script itself does not,
    # so running python directly in an sbatch script stays single-process.
    if not all(k in env for k in ("SLURM_PROCID", "SLURM_STEP_NODELIST")):
        return None
    count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if count_var not in env:
        return None
    out: dict = {
        "source": "slurm",
        "num_processes": _env_int(env, count_var),
        "process_id": _env_int(env, "SLURM_PROCID"),
    }
    if "SLURM_JOB_ID" in env or "JAX_COORDINATOR_PORT" in env:
        job_id = _env_int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        host = first_host(env["SLURM_STEP_NODELIST"])
        out["coordinator_address"] = f"{host}:{_port(env, job_id)}"
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    if "SLURM_LOCALID" in env:
        out["local_device_ids"] = _local_devices(
            env, _tasks_per_node(per_node), _env_int(env, "SLURM_LOCALID")
        )
    return out


def _openmpi(env: Mapping[str, str]) -> dict | None:
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    out: dict = {
        "source": "openmpi",
        "num_processes": _env_int(env, "OMPI_COMM_WORLD_SIZE"),
        "process_id": _env_int(env, "OMPI_COMM_WORLD_RANK"),
        "address_hint": " (Open MPI 5 has no ORTE launcher address to take it from)",
    }
    uri = env.get("OMPI_MCA_orte_hnp_uri")  # e.g. "1531576320.0;tcp://10.96.0.1,10.0.0.2:34911"
    if uri:
        ip = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
        if ip is not None:
            host = next(g for g in ip.groups() if g is not None)
            job_id = int(uri.split(".", 1)[0]) // 2**12 if uri.split(".", 1)[0].isdigit() else 0
            out["coordinator_address"] = f"{host}:{_port(env, job_id)}"
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        local_size = _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if (
            "OMPI_COMM_WORLD_LOCAL_SIZE" in env) else 1
        out["local_device_ids"] = _local_devices(
            env, local_size, _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        )
    return out


# ----------------------------------------------------------------------------- effects


_current: ProcessGroup | None = None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    hold_interrupt: bool = False,
    watch_peers: bool = True,
    peer_timeout_s: float = peers.SILENCE_S,
) -> ProcessGroup | None:
    """Joins the multi-process run described by flags or the cluster; ``None`` when single.

    Must run before anything touches a device. Safe to call twice (the second
    call returns the group of the first; ``None`` if the caller initialized
    ``jax.distributed`` itself). On CPU, cross-process collectives
    use gloo. Raises ``DistributedError`` (one line) on bad settings or when
    JAX has already started on devices.

    A Ctrl-C while joining comes once this process has joined: raised here, or with
    ``hold_interrupt`` by the next :func:`start_together`, which tells the others first
    (raised inside the join, it left them waiting until JAX aborted them).

    With ``watch_peers`` (default) a process of the run that ends unplanned (killed, or
    failing alone) ends this one too, at once, with one line and status 1
    (``jaxtrain.peers``); without it, JAX aborts the others ~100 s later. So does one
    unheard for ``peer_timeout_s`` seconds (its host down or cut off, the process
    frozen; 0: left to JAX's heartbeats, 100 s or, when longer, ``peer_timeout_s`` + 30 s).
    """
    global _current, _interrupted
    if jax.distributed.is_initialized():
        return _current
    if not (peer_timeout_s >= 0 and math.isfinite(peer_timeout_s)):
        raise DistributedError(f"--peer-timeout must be finite and >= 0, got {peer_timeout_s}")
    group = detect(coordinator_address, num_processes, process_id)
    if group is None:
        return None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A peer that never joins never tells. Say what is awaited, and end the wait with a
    # line of our own: at its own deadline JAX aborts the process (SIGABRT, a C++ trace
    # of RegisterTask's DEADLINE_EXCEEDED), through a callback that jaxlib 0.10 cannot
    # take from Python (one raises std::bad_cast). So JAX gets a later deadline than
    # ours. (A process that joins and then fails its checks tells: start_together.)
    print(f"process {group.process_id} of {group.num_processes}: joining at "
          f"{group.coordinator_address} (waits up to {timeout_s} s for every process)",
          file=sys.stderr, flush=True)
    deadline = threading.Timer(timeout_s, _not_joined, (group, timeout_s))
    deadline.daemon = True
    deadline.start()
    try:
        with _sigint_held() as came:
            jax.distributed.initialize(
                coordinator_address=group.coordinator_address,
                num_processes=group.num_processes,
                process_id=group.process_id,
                local_device_ids=(list(group.local_device_ids) if group.local_device_ids
                                  else None),
                # Resolved above; jax's own detection would pin each process to one GPU.
                cluster_detection_method="deactivate",
                initialization_timeout=timeout_s + JAX_JOIN_GRACE_S,
                # Ours ends a silent process first; JAX's must not come before it.
                heartbeat_timeout_seconds=max(JAX_HEARTBEAT_S,
                                              math.ceil(peer_timeout_s) + JAX_HEARTBEAT_GRACE_S),
            )
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "must be called before" in first:
            raise DistributedError(
                "jaxtrain.distributed.initialize must run before anything uses a device "
                "(jax.devices(), jax.process_index(), any computation)"
            ) from None
        raise
    finally:
        deadline.cancel()
    _orbax_host_barriers()
    _current = group
    if watch_peers:
        from jax._src.distributed import global_state  # no public key-value store in jax

        host = group.coordinator_address.rpartition(":")[0].strip("[]")
        peers.watch(group.process_id, group.num_processes, host, global_state.client,
                    silence_s=peer_timeout_s)
    if came:
        if not hold_interrupt:
            raise KeyboardInterrupt
        _interrupted = True
    return group


JAX_JOIN_GRACE_S = 60  # JAX's own join deadline comes this much after ours
JAX_HEARTBEAT_S = 100  # jax.distributed.initialize's default heartbeat_timeout_seconds
JAX_HEARTBEAT_GRACE_S = 30  # a longer --peer-timeout moves JAX's this much past it
_LAUNCHERS = {"slurm": "SLURM", "openmpi": "Open MPI"}


def _not_joined(group: ProcessGroup, timeout_s: int) -> None:
    """Ends a process whose join outlived ``timeout_s`` (a timer thread's call: the join
    blocks the main thread in C++). Status 1: no process ran anything yet."""
    n = group.num_processes
    hint = (f"start all {n} with the same --coordinator-address and --num-processes, each "
            "with its own --process-id" if group.source == "flags"
            else f"check that the {_LAUNCHERS.get(group.source, group.source)} job "
                 f"started all {n} tasks")
    print(f"error: process {group.process_id} of {n}: not every process joined at "
          f"{group.coordinator_address} within {timeout_s} s; {hint}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


@contextlib.contextmanager
def _sigint_held() -> Iterator[list[int]]:
    """Holds Ctrl-C (Python's default handler only, main thread only) for the block; the
    yielded list gets an item for each that came."""
    came: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield came
        return
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield came
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


START_WAIT_S = 1800  # how long a process waits for the others' start-up checks (data loads)
_start_failed = False  # a process of this run could not start: cli exits through a barrier
_start_round = 0  # start_together calls so far: each process makes the same calls
_interrupted = False  # a Ctrl-C came while joining (initialize's hold_interrupt)


def start_failed() -> bool:
    """True when :func:`start_together` found a process that could not start."""
    return _start_failed


@contextlib.contextmanager
def start_together() -> Iterator[None]:
    """Runs a joined process's start-up checks (paths, data, devices: what may differ
    between hosts) and then tells every process whether every other one passed them.

    A process that fails re-raises its own error; every other one raises
    ``DistributedError``: ``process I could not start: <its error>``. Without this, a
    process that could not read its data left the others waiting in their first
    collective until JAX aborted them. Needs :func:`initialize`'s group (a no-op for
    one process, or when the caller joined on its own). Exchanged through JAX's
    coordination service, not a collective: the devices are not set up yet."""
    global _start_failed, _start_round, _interrupted
    group = _current
    if group is None:
        yield
        return
    from jax._src.distributed import global_state  # no public key-value store in jax

    client = global_state.client
    _start_round += 1
    prefix = f"jaxtrain:start/{_start_round}"

    def key(pid: int) -> str:
        return f"{prefix}/{pid}"

    try:
        if _interrupted:  # held by initialize: raised here, where the others hear of it
            _interrupted = False
            raise KeyboardInterrupt
        yield
    except BaseException as e:  # Ctrl-C too: the others must not wait for this process
        from jaxtrain.cli import one_line

        _start_failed = True
        line = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else one_line(e)
        client.key_value_set(key(group.process_id), "failed: " + line)
        raise
    client.key_value_set(key(group.process_id), "ok")
    for pid in range(group.num_processes):
        try:
            said = client.blocking_key_value_get(key(pid), START_WAIT_S * 1000)
        except Exception:  # noqa: BLE001  (jax raises its own XlaRuntimeError)
            said = f"failed: no word from it within {START_WAIT_S} s"
        if said != "ok":
            _start_failed = True
            raise DistributedError(f"process {pid} could not start: {said[len('failed: '):]}")


def sync(name: str) -> None:
    """Blocks until every process has reached ``sync(name)``; a no-op for one process.

    Call it from the main thread only, at the same point on every process (it
    is a small device all-reduce, ordered like any other program)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def differing(values: Mapping[str, object]) -> list[str]:
    """Keys of ``values`` whose value is not the same on every process (sorted; ``[]``
    for one process). Values are compared by a CRC32 of their JSON form, gathered over
    processes. Call it at the same point on every process, with the same keys."""
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    keys = sorted(values)
    digests = np.array(
        [zlib.crc32(json.dumps(values[k], sort_keys=True, default=str).encode()) >> 1
         for k in keys], np.int32)  # >> 1: int32 travels through the gather
    table = np.asarray(multihost_utils.process_allgather(digests)).reshape(-1, len(keys))
    return [k for i, k in enumerate(keys) if np.any(table[:, i] != table[0, i])]


def check_same_flags(config: object) -> None:
    """Raises ``DistributedError`` naming the flags (fields of the dataclass ``config``,
    but for its ``PROCESS_FIELDS``) that differ between processes; call it on every
    process right after :func:`initialize`. Started with different flags, processes
    run different programs and fail later in a collective (gloo: "Received data size
    doesn't match expected size") or wait in one for good."""
    local = getattr(config, "PROCESS_FIELDS", frozenset())
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in local}
    if differ := differing(values):
        flags = ", ".join("--" + name.replace("_", "-") for name in differ)
        free = ", ".join("--" + name.replace("_", "-") for name in sorted(local))
        raise DistributedError(
            f"the processes were started with different {flags}; start every process "
            f"with the same flags (only {free} may differ)"
        )


def from_process_0(text: str, size: int = 1024) -> str:
    """Process 0's ``text`` on every process (at most ``size`` UTF-8 bytes; ``text`` itself
    for one process). Call it at the same point on every process."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8)
    return got.tobytes().rstrip(b"\0").decode(errors="replace")


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (each may measure its own, e.g. free
    memory); ``value`` itself for one process. Call it at the same point on every process.
    Values travel as int32: pass sizes in MiB, not bytes."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def _orbax_host_barriers() -> None:
    """Makes Orbax synchronize processes through the coordination service.

    Orbax (0.12) otherwise syncs with ``sync_global_devices``, a device
    all-gather. Run from a background save thread, it interleaves with the
    train step's all-reduce in a different order on each process, and both
    processes hang (seen with 2 processes x 2 CPU devices). The key-value
    barrier needs no device.
    """
    try:
        import orbax.checkpoint  # noqa: F401  (defines the flag)
        from absl import flags
    except ImportError:
        return
    name = "experimental_orbax_use_distributed_barrier"
    if name in flags.FLAGS:
        flag = flags.FLAGS[name]
        flag.value, flag.present = True, max(flag.present, 1)  # readable without parsing argv
