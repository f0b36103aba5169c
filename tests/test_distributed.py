"""Multi-process runs: settings from flags / SLURM / Open MPI, and the same result
from 2 processes x 2 devices as from 1 process x 4 devices.

The two-process cases start subprocesses on 127.0.0.1 (gloo collectives on
CPU); this file doubles as their worker script (``python
tests/test_distributed.py worker ...``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
SAVE_EVERY = 3
# jaxtrain.peers' line for a process that ended unplanned (not imported: it imports jax)
SILENT = "ended without a word (killed by a signal: SIGKILL, the OOM killer? or its host went down)"
RERUN = "its own output says why; rerun the same command on every process to resume"


# ----------------------------------------------------------------------------- worker


def worker(out: str, kind: str, num_processes: int, process_id: int, port: int) -> None:
    """Trains ``STEPS`` steps of the MLP (with dropout) under ``kind``, checkpointing
    every ``SAVE_EVERY`` steps while steps keep running (Orbax's barriers must not
    interleave with the step's all-reduce), then writes its params and eval sums."""
    import jax

    from jaxtrain import data as data_lib
    from jaxtrain import distributed
    from jaxtrain.checkpoint import Checkpointer, state_tree
    from jaxtrain.config import TrainConfig
    from jaxtrain.parallel import create_strategy, prefetch
    from jaxtrain.program import build_model_and_state, make_update, step_key
    from jaxtrain.steps import eval_step

    group = distributed.initialize(
        f"127.0.0.1:{port}" if num_processes > 1 else None, num_processes, process_id
    )
    assert (group is None) == (num_processes == 1)
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    config = TrainConfig(model="mlp", dropout=0.2, batch_size=32, lr=2e-3, seed=5)
    ds = data_lib.load_dataset("digits")
    n = len(ds.train["label"])
    strategy = create_strategy(kind)
    assert strategy.num_devices == 4
    strategy.check_batch_size(config.batch_size)
    update = strategy.compile(make_update(config, resident=False), donate_argnums=(0,))
    state = strategy.replicate(build_model_and_state(config, ds, STEPS))
    key = strategy.replicate(step_key(config.seed))
    pid, nproc = jax.process_index(), jax.process_count()
    rows = slice(pid * config.batch_size // nproc, (pid + 1) * config.batch_size // nproc)

    def local_batch(step):  # this process's share of the global batch only
        idx = data_lib.batch_indices(config.seed, step, n, config.batch_size)
        return data_lib.take(ds.train, idx[rows])

    ckpt = Checkpointer(out)
    for step, batch in enumerate(prefetch(map(local_batch, range(STEPS)), strategy.shard)):
        state, metrics = update(state, batch, key)
        if (step + 1) % SAVE_EVERY == 0:  # saved on a background thread while steps go on
            ckpt.save(step + 1, state_tree(strategy.unreplicate(state)), {"step": step + 1})
    ckpt.close()

    evaluate = strategy.compile(eval_step)
    sums = None
    for batch in data_lib.eval_batches(ds.test, 64):
        local = {k: np.array_split(v, nproc)[pid] for k, v in batch.items()}
        out_sums = evaluate(state, strategy.shard(local))
        sums = out_sums if sums is None else jax.tree.map(lambda a, b: a + b, sums, out_sums)
    result = {k: float(v) for k, v in strategy.unreplicate(sums).items()}
    result["loss"] = float(strategy.unreplicate(metrics)["loss"])
    with open(os.path.join(out, f"result_{pid}.json"), "w") as f:
        json.dump(result, f)
    leaves = jax.tree.leaves(strategy.unreplicate(state.params))
    np.savez(os.path.join(out, f"params_{pid}.npz"), *leaves)


def failing_worker(process_id: int, port: int) -> None:
    """A CLI body in a 2-process group where process 1 fails while process 0 waits for
    it in a collective; exits with ``cli.run``'s status."""
    from jaxtrain import cli, distributed
    from jaxtrain.config import TrainConfig

    def body(config):
        distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
        distributed.sync("jaxtrain-test:started")
        if process_id == 1:
            raise RuntimeError("process 1 fails here")
        distributed.sync("jaxtrain-test:never")  # its peer is gone

    sys.exit(cli.run(TrainConfig, TrainConfig(), [], prog="worker", body=body))


FROZEN_S = 2  # the frozen-worker's --peer-timeout


def frozen_worker(process_id: int, port: int) -> None:
    """A CLI body in a 2-process group: both keep Python busy for longer than the peer
    timeout (their beats go on), then process 1 freezes (SIGSTOP: nothing is closed, as
    when its host vanishes) while process 0 waits for it in a collective."""
    from jaxtrain import cli, distributed
    from jaxtrain.config import TrainConfig

    def body(config):
        distributed.initialize(f"127.0.0.1:{port}", 2, process_id, peer_timeout_s=FROZEN_S)
        distributed.sync("jaxtrain-test:started")
        busy_until = time.monotonic() + 2 * FROZEN_S
        while time.monotonic() < busy_until:  # the main thread holds the GIL, in turns
            sum(range(10_000))
        distributed.sync("jaxtrain-test:busy")
        if process_id == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        distributed.sync("jaxtrain-test:never")  # process 1 is frozen

    sys.exit(cli.run(TrainConfig, TrainConfig(), [], prog="worker", body=body))


def peer_gone_worker(process_id: int, port: int, go: str) -> None:
    """A CLI body in a 2-process group: process 1 ends after the join (status 3); process
    0 waits for the file ``go`` (made once process 1 has ended), then meets a collective.
    Unwatched (``watch_peers=False``): the collective's own failure is under test."""
    from jaxtrain import cli, distributed
    from jaxtrain.config import TrainConfig

    def body(config):
        distributed.initialize(f"127.0.0.1:{port}", 2, process_id, watch_peers=False)
        distributed.sync("jaxtrain-test:started")
        if process_id == 1:
            os._exit(3)
        while not os.path.exists(go):
            time.sleep(0.05)
        distributed.from_process_0("hello")

    sys.exit(cli.run(TrainConfig, TrainConfig(), [], prog="worker", body=body))


def start_worker(workdir: str, process_id: int, port: int, case: str) -> None:
    """The digits-MLP CLI as process ``process_id`` of 2, in one of three start-ups:
    - ``crash-on-0``: process 0's data load fails with a bug (exit 1);
    - ``slow-peer``: process 0 cannot start (its --compilation-cache) while process 1
      still loads its data (8 s), longer than the exit barrier's usual wait (here 2 s);
    - ``ctrl-c-while-joining``: process 1 gets Ctrl-C inside ``jax.distributed.initialize``."""
    import signal

    import jax

    from experiments import digits_mlp
    from jaxtrain import cli, data

    argv = ["--workdir", workdir, "--compilation-cache", "", "--progress", "none",
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(process_id)]
    if case == "crash-on-0" and process_id == 0:
        def gone(*args, **kwargs):
            raise RuntimeError("the data disk is gone")

        data.load_dataset = gone
    elif case == "slow-peer":
        cli.BAD_INPUT_WAIT_S = 2
        if process_id == 0:
            argv += ["--compilation-cache", "/proc/jaxtrain-xla"]
        else:
            load = data.load_dataset

            def slow_load(*args, **kwargs):
                time.sleep(8)
                return load(*args, **kwargs)

            data.load_dataset = slow_load
    elif case == "ctrl-c-while-joining" and process_id == 1:
        join = jax.distributed.initialize

        def interrupted_join(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            return join(*args, **kwargs)

        jax.distributed.initialize = interrupted_join
    sys.exit(digits_mlp.main(argv))


def workdir_worker(workdir: str, process_id: int, port: int) -> None:
    """``resume.check_shared_workdir`` in a 2-process CLI body where each process passes
    its own folder (as a workdir on each host's own disk would be)."""
    from jaxtrain import cli, distributed
    from jaxtrain.config import TrainConfig
    from jaxtrain.resume import check_shared_workdir

    def body(config):
        distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
        for _ in range(2):  # as two runs in one process would: each round its own keys
            with distributed.start_together():
                pass
        check_shared_workdir(workdir)

    sys.exit(cli.run(TrainConfig, TrainConfig(), [], prog="worker", body=body))


def sigterm_worker(process_id: int, port: int) -> None:
    """Joins 2 processes; process 1 calls ``sigterm_ends_the_process`` and sends itself
    SIGTERM, which must end it (JAX's preemption notifier otherwise only records it)."""
    import signal
    import time

    from jaxtrain import distributed
    from jaxtrain.preemption import sigterm_ends_the_process

    distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    distributed.sync("jaxtrain-test:joined")
    if process_id == 1:
        sigterm_ends_the_process()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still running after SIGTERM", flush=True)
        os._exit(0)
    time.sleep(60)  # jaxtrain.peers ends it once process 1 is gone
    os._exit(0)


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def run_all(
    commands: list[tuple[list[str], int]], timeout: float = 420
) -> list[subprocess.CompletedProcess]:
    """Starts every ``(command, fake device count)`` at once (the processes of one run
    must meet), waits for all; kills any left if one hangs."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=cpu_env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c, devices in commands]
    results = []
    try:
        for p, (c, _) in zip(procs, commands):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def check_ok(results):
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stderr[-4000:]}"


def worker_runs(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """Folders of a 2-process x 2-device run and a 1-process x 4-device run (run together)."""
    commands = []
    for n in (2, 1):
        out = tmp_path / f"{kind}_{n}"
        out.mkdir()
        port = free_port()
        commands += [([sys.executable, __file__, "worker", str(out), kind, str(n), str(pid),
                       str(port)], 4 // n) for pid in range(n)]
    check_ok(run_all(commands))
    return tmp_path / f"{kind}_2", tmp_path / f"{kind}_1"


def load_npz(path: Path) -> list[np.ndarray]:
    z = np.load(path)
    return [z[f"arr_{i}"] for i in range(len(z.files))]


def assert_close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        err = np.linalg.norm(x - y) / np.linalg.norm(y)
        assert err <= rtol, f"leaf {i}: relative difference {err:.3g} > {rtol}"


# ----------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("kind", ["mesh", pytest.param("pmap", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_as_many_devices(tmp_path, kind):
    two, one = worker_runs(tmp_path, kind)
    ref = load_npz(one / "params_0.npz")
    for pid in (0, 1):  # every process ends with the same params ...
        assert_close(load_npz(two / f"params_{pid}.npz"), ref)
    ref_eval = json.loads((one / "result_0.json").read_text())
    for pid in (0, 1):  # ... and the same eval sums over the whole test split
        got = json.loads((two / f"result_{pid}.json").read_text())
        assert got["count"] == ref_eval["count"] > 0
        assert got["correct"] == ref_eval["correct"]
        assert got["loss_sum"] == pytest.approx(ref_eval["loss_sum"], rel=1e-5)
        assert got["loss"] == pytest.approx(ref_eval["loss"], rel=1e-5)

    from jaxtrain.checkpoint import load_params

    # The checkpoints (saved while steps ran on) hold the same params, midway and last.
    for step in (STEPS - SAVE_EVERY, STEPS):
        a = [np.asarray(x) for x in _leaves(load_params(str(two), step))]
        b = [np.asarray(x) for x in _leaves(load_params(str(one), step))]
        assert_close(a, b)
    assert_close([np.asarray(x) for x in _leaves(load_params(str(two)))], ref)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def pair(flags: list[str], port: int, extra: tuple[list[str], list[str]] = ([], [])
         ) -> list[tuple[list[str], int]]:
    """The two processes (2 fake devices each) of a digits-MLP CLI run on ``port``."""
    return [([sys.executable, "-m", "experiments.digits_mlp", "--compilation-cache", "",
              *flags, *extra[pid], "--coordinator-address", f"127.0.0.1:{port}",
              "--num-processes", "2", "--process-id", str(pid)], 2) for pid in (0, 1)]


def test_multi_process_bad_input_exits_2_on_every_process(tmp_path):
    """Bad input in a multi-process run: every process exits 2 with the same one line,
    no traceback and no SIGABRT. Run together on purpose (8 processes on 2 cores):
    - --parallel none is refused before any process joins (from flags, and from a
      SLURM step in the loop, where no flag says "2 processes");
    - a batch that does not split over the 4 devices of both processes and flags that
      differ between the processes are found only after they join. Leaving then,
      process 0 ended the coordination service while process 1 still ran, and JAX
      aborted process 1 (SIGABRT, -6, "Terminating process because the JAX
      distributed service detected fatal errors"): 2 of 22 tries under load.
    - a --workdir that is not one shared folder (each process passes its own here);
    - a --workdir that another run holds (process 0 finds its lock, process 1 is told);
    - a check that fails on one host only (process 1's --compilation-cache): process 0
      is told instead of waiting 300 s for process 1 in its first collective."""
    from jaxtrain import workdir_lock

    none, batch, differ, busy, local = (
        pair(["--workdir", str(tmp_path / name), *flags], free_port(), extra)
        for name, flags, extra in [
            ("none", ["--parallel", "none"], ([], [])),
            ("batch", ["--batch-size", "62"], ([], [])),
            ("differ", ["--epochs", "2"], ([], ["--lr", "0.01", "--seed", "1"])),
            ("busy", [], ([], [])),
            ("local", [], ([], ["--compilation-cache", "/proc/jaxtrain-xla"]))])
    port = free_port()
    (tmp_path / "own0" / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "own1").mkdir()
    own = [([sys.executable, __file__, "workdir-worker", str(tmp_path / f"own{pid}"), str(pid),
             str(port)], 1) for pid in (0, 1)]
    with workdir_lock.hold(str(tmp_path / "busy")):  # "another run" holds it meanwhile
        holder = json.loads((tmp_path / "busy" / workdir_lock.LOCK_NAME).read_text())
        results = run_all(none + batch + differ + own + busy + local, timeout=300)
    # The same from a SLURM step of two tasks (no flags): refused in the loop, not Config.
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "JAX_COORDINATOR_PORT": str(port)}
    slurm_run = subprocess.run(none[0][0][:-6] + ["--workdir", str(tmp_path / "slurm")],
                               cwd=ROOT, check=False, env={**cpu_env(2), **slurm},
                               capture_output=True, text=True, timeout=300)
    single = "--parallel none cannot run across several processes"
    split = ("--batch-size 62 does not split evenly over 4 device(s) in 2 process(es) "
             "(needs a multiple of 4); nearest valid: 60, 64")
    flags = ("the processes were started with different --lr, --seed; start every process "
             "with the same flags (only --compilation-cache, --coordinator-address, "
             "--data-dir, --process-id, --progress may differ)")
    shared = ("the processes see different checkpoints in --workdir {} (process {}); "
              "it must be one folder that every process shares")
    cache = ("--compilation-cache /proc/jaxtrain-xla is not writable (cannot create a file in "
             "/proc: No such file or directory) (pass --compilation-cache '' to run without it)")
    in_use = (f"--workdir {tmp_path / 'busy'} is in use by another run (pid {holder['pid']} "
              f"on {holder['host']}, started {holder['started']}); wait for it to end or use "
              "another --workdir")
    expected = [single, single, split, split, flags, flags,
                shared.format(tmp_path / "own0", "0: 1 item in checkpoints/"),
                shared.format(tmp_path / "own1", "1: no checkpoints/ folder"),
                in_use, in_use, f"process 1 could not start: {cache}", cache, single]
    for r, message in zip([*results, slurm_run], expected, strict=True):
        assert r.returncode == 2, r.stderr[-3000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message}"], r.stderr[-3000:]
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "slurm" / "config.json").exists()
    assert not (tmp_path / "differ" / "config.json").exists()
    assert os.listdir(tmp_path / "busy") == []  # the lock went with its holder; nothing else


def test_sigterm_after_training_ends_a_multi_process_run_at_once():
    """After training (the robustness suite) SIGTERM ends a process of a multi-process
    run at once, as it does a single process; JAX's notifier swallowed it before. Its
    peer hears of it (``jaxtrain.peers``) and ends too, in one line."""
    port = free_port()
    results = run_all([([sys.executable, __file__, "sigterm-worker", str(pid), str(port)], 1)
                       for pid in (0, 1)], timeout=120)
    assert results[1].returncode == -signal.SIGTERM, results[1].stdout + results[1].stderr[-2000:]
    assert results[0].returncode == 1, results[0].stderr[-2000:]
    assert results[0].stderr.strip().splitlines()[-1] == f"error: process 1 of 2 {SILENT}; {RERUN}"


def cli_two_and_one(tmp_path: Path, *flags: str, module: str = "digits_mlp"
                    ) -> tuple[Path, Path, dict, dict]:
    """The digits-MLP CLI (or ``experiments.<module>``) with ``flags`` as 2 processes x
    2 devices and as 1 process x 4 devices, run together; asserts both end with the
    same params. Returns the two workdirs and their summaries."""
    from jaxtrain.checkpoint import load_params

    base = [sys.executable, "-m", f"experiments.{module}", "--parallel", "mesh",
            "--compilation-cache", "", "--progress", "none", *flags]
    port = free_port()
    two, one = tmp_path / "two", tmp_path / "one"
    check_ok(run_all([(base + ["--workdir", str(two), "--coordinator-address",
                               f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(pid)], 2) for pid in (0, 1)]
                     + [(base + ["--workdir", str(one)], 4)]))
    assert_close([np.asarray(x) for x in _leaves(load_params(str(two)))],
                 [np.asarray(x) for x in _leaves(load_params(str(one)))])
    return (two, one, json.loads((two / "summary.json").read_text()),
            json.loads((one / "summary.json").read_text()))


@pytest.mark.slow
def test_cli_two_processes_match_one_process(tmp_path):
    """The experiment CLI end to end: 2 processes x 2 devices == 1 process x 4 devices,
    only process 0 writes the logs (one line per step and split)."""
    two, _, s2, s1 = cli_two_and_one(tmp_path, "--epochs", "2")
    assert s2["test_accuracy"] == s1["test_accuracy"]
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)
    assert s2["num_devices"] == 4
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) > 0


@pytest.mark.slow
def test_cli_two_processes_seed_run_matches_one_process(tmp_path):
    """A 4-seed run (chunk picked automatically, agreed by both processes) across
    2 processes x 2 devices equals the same run in 1 process x 4 devices."""
    _, _, s2, s1 = cli_two_and_one(tmp_path, "--epochs", "1", "--num-seeds", "4")
    assert s2["seed_chunk"] == s1["seed_chunk"] == 4
    assert s2["test_accuracy_per_seed"] == s1["test_accuracy_per_seed"]


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cli_two_processes_seed_parallel_run_matches_one_process(tmp_path, placement):
    """--seed-parallel across 2 processes x 2 devices: each process's devices hold
    their own seeds, so each process feeds them whole batches (not its rows of them)
    and evaluates them on the whole split; the run equals 1 process x 4 devices."""
    _, _, s2, s1 = cli_two_and_one(tmp_path, "--epochs", "1", "--num-seeds", "4",
                                   "--seed-parallel", "--data-placement", placement)
    assert s2["seed_parallel"] is s1["seed_parallel"] is True
    assert s2["test_accuracy_per_seed"] == s1["test_accuracy_per_seed"]
    assert s2["test_loss_per_seed"] == pytest.approx(s1["test_loss_per_seed"], rel=1e-5)


def _numbers(tree, path=""):
    """``{path: number}`` of every number in a JSON tree."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{path}[{i}]").items()}
    return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.slow
def test_cli_two_processes_robustness_suite_matches_one_process(tmp_path):
    """The main job's robustness suite after a 2-process x 2-device seed run: every
    process reads only its own devices' memory (another's raises), they agree on the
    chunks, and the report equals 1 process x 4 devices' (accuracies exactly)."""
    two, one, _, _ = cli_two_and_one(tmp_path, "--epochs", "1", "--num-seeds", "2",
                                     module="digits_seeds")
    a, b = (json.loads((w / "robustness" / "report.json").read_text()) for w in (two, one))
    a, b = (_numbers({k: v for k, v in r.items() if k not in ("timing", "wall_seconds")})
            for r in (a, b))
    assert a.keys() == b.keys() and len(a) > 1000
    for key in a:
        if "accuracy" in key:
            assert a[key] == b[key], key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_one_signal_preempts_both_processes_at_one_step_and_the_rerun_resumes(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync stops both processes after the
    same step (each saving where it stopped, they hung in different Orbax barriers);
    both save it and exit 143. Rerunning resumes and ends as 1 process x 4 devices did."""
    from jaxtrain.checkpoint import Checkpointer, load_params

    base = [sys.executable, "-m", "experiments.digits_mlp", "--parallel", "mesh", "--epochs", "8",
            "--compilation-cache", "", "--progress", "log", "--log-every", "5"]
    two, one = tmp_path / "two", tmp_path / "one"

    def two_processes() -> list[subprocess.Popen]:
        port = free_port()
        return [subprocess.Popen(
            base + ["--workdir", str(two), "--coordinator-address", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(pid)],
            cwd=ROOT, env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in (0, 1)]

    reference = subprocess.Popen(base + ["--workdir", str(one)], cwd=ROOT, env=cpu_env(4),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = first = two_processes()
    try:
        for line in procs[0].stdout:  # process 0 logs; signal once training is under way
            if (m := re.match(r"step (\d+) train", line)) and int(m.group(1)) >= 20:
                break
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
        assert not (two / "summary.json").exists()
        reader = Checkpointer(str(two), read_only=True)
        latest = reader.latest_step()
        reader.close()
        procs = two_processes()  # the same command again: it resumes
        resumed = [p.communicate(timeout=300) for p in procs]
        _, reference_err = reference.communicate(timeout=300)
    finally:
        for p in (*first, *procs, reference):
            p.kill()
    stopped = set()
    for p, (_, err) in zip(first, outs):
        assert p.returncode == 143, err[-3000:]
        m = re.search(r"preempted by SIGTERM at step (\d+): checkpoint saved", err)
        assert m, err[-3000:]
        stopped.add(int(m.group(1)))
    assert len(stopped) == 1, stopped  # one step, on both
    step = stopped.pop()
    assert latest == step >= 20  # the step both reported is the one saved
    check_ok([subprocess.CompletedProcess(p.args, p.returncode, *out)
              for p, out in zip(procs, resumed)])
    assert reference.returncode == 0, reference_err[-3000:]
    assert_close([np.asarray(x) for x in _leaves(load_params(str(two)))],
                 [np.asarray(x) for x in _leaves(load_params(str(one)))])
    s2, s1 = (json.loads((w / "summary.json").read_text()) for w in (two, one))
    assert s2["resumed_from_step"] == step and s1["resumed_from_step"] is None
    assert s2["test_accuracy"] == s1["test_accuracy"]


@pytest.mark.slow
def test_start_up_failures_end_every_process_cleanly(tmp_path):
    """A process that cannot start tells the others, which exit 2 naming it; before,
    they waited for it in their first collective until JAX aborted them.
    - Process 0, the coordinator's host, fails with a bug loading its data: it exits 1
      with its traceback.
    - It waits at the exit barrier until a slower peer has heard of it (it left after
      BAD_INPUT_WAIT_S, and JAX aborted the peer still loading its data).
    - A Ctrl-C inside the join is held until the others can be told (raised there, it
      left them waiting until JAX aborted them)."""
    cases = ["crash-on-0", "slow-peer", "ctrl-c-while-joining"]
    results = run_all([([sys.executable, __file__, "start-worker", str(tmp_path / case),
                         str(pid), str(port), case], 2)
                       for case in cases for port in [free_port()] for pid in (0, 1)],
                      timeout=120)
    cache = ("--compilation-cache /proc/jaxtrain-xla is not writable (cannot create a file "
             "in /proc: No such file or directory) (pass --compilation-cache '' to run "
             "without it)")
    expected = [(1, None), (2, "process 0 could not start: the data disk is gone"),
                (2, cache), (2, f"process 0 could not start: {cache}"),
                (2, "process 1 could not start: interrupted (Ctrl-C)"), (130, "interrupted")]
    for r, (status, message) in zip(results, expected, strict=True):
        assert r.returncode == status, r.stderr[-3000:]
        if message is None:  # a bug: its traceback
            assert "RuntimeError: the data disk is gone" in r.stderr
            continue
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message}"], r.stderr[-3000:]
        assert "Traceback" not in r.stderr
    assert not any((tmp_path / case).exists() for case in cases)


def test_a_failing_process_exits_at_once_though_its_peer_waits_for_it():
    """Process 1 of 2 fails while process 0 waits for it in a collective: process 1
    reports and exits 1 at once, not after JAX's 5-minute shutdown barrier, and process 0
    hears of it (``jaxtrain.peers``) and ends in one line, not ~100 s later when JAX
    aborted it for the missed heartbeats."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "failing-worker", str(pid), str(port)],
                              cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        _, err = procs[1].communicate(timeout=120)  # 300+ s before the change
        assert procs[1].returncode == 1, err[-3000:]
        assert "RuntimeError: process 1 fails here" in err
        _, err = procs[0].communicate(timeout=20)
        assert procs[0].returncode == 1, err[-3000:]
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"error: process 1 of 2 ended with exit status 1; {RERUN}")
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_a_frozen_process_ends_the_other_after_the_peer_timeout():
    """Process 1 of 2 freezes (SIGSTOP), closing nothing, as when its host vanishes,
    while process 0 waits for it in a collective: process 0 ends with one line about
    --peer-timeout seconds later, not when JAX's heartbeats time out (100 s, SIGABRT)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "frozen-worker", str(pid), str(port)],
                              cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        stat = Path(f"/proc/{procs[1].pid}/stat")
        deadline = time.monotonic() + 120
        while stat.read_text().rpartition(")")[2].split()[0] != "T":  # stopped
            assert time.monotonic() < deadline and procs[0].poll() is None, (
                procs[0].communicate()[1][-3000:])
            time.sleep(0.02)
        frozen = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - frozen
        assert procs[0].returncode == 1, err[-3000:]
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"error: process 1 of 2 was not heard from for {FROZEN_S} s (its host down or cut "
            f"off, or the process frozen? --peer-timeout sets how long); {RERUN}")
        assert FROZEN_S - 1 < took < FROZEN_S + 15, took
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.communicate()


def test_a_collective_whose_peer_ended_fails_in_one_line(tmp_path):
    """Process 1 ends; process 0's next collective fails (gloo: connection closed by
    peer) and cli.run reports it in one line, status 1, not a traceback."""
    port, go = free_port(), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, __file__, "peer-gone-worker", str(pid),
                               str(port), str(go)], cwd=ROOT, env=cpu_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    try:
        assert procs[1].wait(timeout=120) == 3
        go.touch()
        _, err = procs[0].communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert procs[0].returncode == 1, err[-3000:]
        assert "Traceback" not in err
        assert re.fullmatch(r"error: another process of this run ended \(.*Gloo .*Connection "
                            r"(closed|reset) by peer.*\); its own output says why; rerun the "
                            r"same command on every process to resume", last), last
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.mark.slow
def test_a_process_killed_in_training_ends_the_other_at_once_and_the_rerun_finishes(tmp_path):
    """kill -9 of process 1 while both train: process 0 waited in the step's collective
    until JAX aborted it (status 134 and a C++ trace, ~80 s after the kill). Now it ends
    at once with one line (``jaxtrain.peers``), and the same command finishes the run."""
    base = [sys.executable, "-m", "experiments.digits_mlp", "--parallel", "mesh",
            "--epochs", "60", "--compilation-cache", "", "--progress", "log",
            "--log-every", "5", "--checkpoint-every", "10", "--workdir", str(tmp_path)]

    def two_processes() -> list[subprocess.Popen]:
        port = free_port()
        return [subprocess.Popen(
            base + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(pid)],
            cwd=ROOT, env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in (0, 1)]

    procs = first = two_processes()
    try:
        for line in procs[0].stdout:
            if (m := re.match(r"step (\d+) train", line)) and int(m.group(1)) >= 30:
                break
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
        procs[1].communicate()
        procs = two_processes()  # the same command again: it resumes and ends
        resumed = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in (*first, *procs):
            p.kill()
    assert first[0].returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: process 1 of 2 {SILENT}; {RERUN}", err[-3000:]
    assert "Traceback" not in err
    assert took < 30, took  # JAX's heartbeat abort came after ~80 s
    check_ok([subprocess.CompletedProcess(p.args, p.returncode, *out)
              for p, out in zip(procs, resumed)])
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] >= 10


@pytest.mark.slow
def test_cli_two_processes_fused_steps_match_one_process(tmp_path):
    """--steps-per-call 5 over a mesh that spans 2 processes (each places its rows of
    the [K, B] indices: Strategy.shard_steps) equals the same run in one process."""
    _, _, s2, s1 = cli_two_and_one(tmp_path, "--epochs", "1", "--steps-per-call", "5")
    assert s2["steps_per_call"] == s1["steps_per_call"] == 5
    assert s2["test_accuracy"] == s1["test_accuracy"]
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- detection


SLURM = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[007-008],cpu1",
    "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_single_process_when_nothing_is_set():
    from jaxtrain.distributed import detect

    assert detect(environ={}) is None
    assert detect(num_processes=1, environ=SLURM) is None  # explicit: stay alone
    assert detect(environ={**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None


def test_flags():
    from jaxtrain.distributed import ProcessGroup, detect

    group = detect("10.0.0.1:1234", 4, 2, environ={})
    assert group == ProcessGroup("10.0.0.1:1234", 4, 2, None, "flags")
    group = detect(None, 2, 1, environ={"JAX_COORDINATOR_ADDRESS": "h:99"})
    assert group.coordinator_address == "h:99"


def test_slurm_step():
    from jaxtrain.distributed import detect

    group = detect(environ=SLURM)
    port = 4242 % 4096 + 61440  # jax's own SLURM rule, so mixed launches agree
    assert group.coordinator_address == f"gpu007:{port}"
    assert (group.num_processes, group.process_id) == (4, 3)  # the step's tasks, not the job's
    assert group.local_device_ids == (1,)  # two tasks per node: one GPU each
    assert group.source == "slurm"


def test_slurm_one_task_per_node_drives_every_gpu():
    from jaxtrain.distributed import detect

    env = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_LOCALID": "0"}
    assert detect(environ=env).local_device_ids is None
    # Already bound by the launcher (--gpus-per-task): leave the visible devices alone.
    env = {**SLURM, "CUDA_VISIBLE_DEVICES": "3"}
    assert detect(environ=env).local_device_ids is None


def test_slurm_overrides():
    from jaxtrain.distributed import detect

    env = {**SLURM, "JAX_COORDINATOR_PORT": "5000"}
    assert detect(environ=env).coordinator_address == "gpu007:5000"
    group = detect("10.1.1.1:7000", environ=SLURM)  # a flag wins over the environment
    assert group.coordinator_address == "10.1.1.1:7000" and group.process_id == 3


def test_sbatch_script_itself_is_not_a_step():
    """Outside srun (no SLURM_STEP_NODELIST) python runs alone, not waiting for peers."""
    from jaxtrain.distributed import detect

    env = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
    assert detect(environ=env) is None


@pytest.mark.parametrize(
    "nodelist, host",
    [("node001", "node001"), ("node001,node002", "node001"), ("gpu[003-004,9],cpu1", "gpu003"),
     ("gpu[12,15]", "gpu12"), ("rack1-[5-8]-ib", "rack1-5-ib"), ("[1-2]", "1")],
)
def test_first_host(nodelist, host):
    from jaxtrain.distributed import first_host

    assert first_host(nodelist) == host


def test_open_mpi():
    from jaxtrain.distributed import DistributedError, detect

    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    orte = {**env, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
    group = detect(environ=orte)
    port = (1531576320 // 4096) % 4096 + 61440
    assert group.coordinator_address == f"10.96.0.1:{port}"
    assert (group.num_processes, group.process_id, group.local_device_ids) == (2, 1, (1,))
    assert detect("h:1", environ=env).coordinator_address == "h:1"  # Open MPI 5: no ORTE
    with pytest.raises(DistributedError, match="Open MPI 5"):
        detect(environ=env)
    # mpirun inside a SLURM allocation: Open MPI's ranks are the processes.
    assert detect(environ={**SLURM, **orte}).source == "openmpi"


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        ({"num_processes": 2, "process_id": 0}, {}, "need a coordinator"),
        ({"coordinator_address": "h:1", "num_processes": 2}, {}, "needs --process-id"),
        ({"coordinator_address": "h:1", "process_id": 1}, {}, "without --num-processes"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
         "--process-id 2 is outside 0..1"),
        ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {}, "not HOST:PORT"),
        ({"num_processes": 0}, {}, "--num-processes must be >= 1"),
        ({"num_processes": 1, "process_id": 1}, {}, "must be 0"),
        ({}, {**SLURM, "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, environ, message):
    from jaxtrain.distributed import DistributedError, detect

    with pytest.raises(DistributedError, match=message) as info:
        detect(environ=environ, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI maps it to exit status 2


def test_a_process_that_never_joins_ends_the_others_with_one_line():
    """Process 1 of 2 never starts: process 0 (the service) ends at its deadline with one
    line and status 1, not JAX's abort 60 s later (SIGABRT and a C++ trace); and so does
    a process 1 whose process 0 never starts (no service to reach)."""
    script = ("import sys\nfrom jaxtrain import distributed\n"
              "distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=3)\n"
              "print('joined')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{free_port()}",
                               str(pid)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    for pid, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        address = proc.args[3]
        assert proc.returncode == 1, (proc.returncode, err[-2000:])
        assert out == ""
        assert err.strip().splitlines() == [
            f"process {pid} of 2: joining at {address} (waits up to 3 s for every process)",
            (f"error: process {pid} of 2: not every process joined at {address} within "
             "3 s; start all 2 with the same --coordinator-address and --num-processes, "
             "each with its own --process-id")]
    assert time.perf_counter() - start < 3 + 30  # JAX's own deadline: 3 + 60 s


def test_initialize_after_devices_are_in_use_is_refused(monkeypatch):
    import jax

    from jaxtrain import distributed

    jax.devices()  # the backend is up (so jax refuses before connecting anywhere)
    for var in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(var)
    assert distributed.initialize() is None  # nothing to join: a no-op
    with pytest.raises(distributed.DistributedError, match="before anything uses a device"):
        distributed.initialize(f"127.0.0.1:{free_port()}", 2, 0, timeout_s=5)
    assert not jax.distributed.is_initialized()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    out_dir, kind_arg, n_arg, pid_arg, port_arg = sys.argv[2:7]
    worker(out_dir, kind_arg, int(n_arg), int(pid_arg), int(port_arg))
if __name__ == "__main__" and sys.argv[1:2] == ["failing-worker"]:
    failing_worker(int(sys.argv[2]), int(sys.argv[3]))
if __name__ == "__main__" and sys.argv[1:2] == ["frozen-worker"]:
    frozen_worker(int(sys.argv[2]), int(sys.argv[3]))
if __name__ == "__main__" and sys.argv[1:2] == ["peer-gone-worker"]:
    peer_gone_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
if __name__ == "__main__" and sys.argv[1:2] == ["start-worker"]:
    start_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
if __name__ == "__main__" and sys.argv[1:2] == ["workdir-worker"]:
    workdir_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
if __name__ == "__main__" and sys.argv[1:2] == ["sigterm-worker"]:
    sigterm_worker(int(sys.argv[2]), int(sys.argv[3]))
