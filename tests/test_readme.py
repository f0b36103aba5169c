"""Docs that cannot drift: every marked block of README.md runs.

Markers (an HTML comment on the line before a fenced block):

- ``<!-- test -->`` before a ```` ```python ```` block: run as a script;
- ``<!-- test:sh -->`` before a ```` ```sh ```` block: run with bash (``-eu -o pipefail``);
- add ``slow`` (``<!-- test:sh slow -->``) for blocks excluded from ``-m "not slow"``.

Each block runs in a fresh directory (relative workdirs land there) with the
repository on ``PYTHONPATH``. Shell commands are the ones a user types, made
small: ``--epochs 1 --progress none`` (and a shared compilation cache) are
appended to every ``python -m experiments.`` command, later flags winning in
argparse. An ``srun`` stand-in starts the command once per ``--ntasks`` with
SLURM's environment on this machine. The fake-device ``XLA_FLAGS`` of the test
session are removed, so commands see the machine a user would.

``JAXTRAIN_README=docs/TOUR.md pytest tests/test_readme.py`` checks another file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, os.environ.get("JAXTRAIN_README", "README.md"))
SMALL_FLAGS = "--epochs 1 --progress none"
MARKER = re.compile(r"<!--\s*test(?P<sh>:sh)?(?P<opts>(?:\s+[\w-]+)*)\s*-->")
LANGS = {"python": ("python", "py"), "sh": ("sh", "bash", "shell", "console")}


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str  # "python" or "sh"
    code: str
    line: int  # 1-based line of the marker
    slow: bool


def parse_blocks(text: str, name: str = "README.md") -> list[Block]:
    """Marked blocks of a markdown text; a marker without its code block is a ValueError."""
    lines = text.splitlines()
    blocks = []
    for i, raw in enumerate(lines):
        m = MARKER.fullmatch(raw.strip())
        if not m:
            continue
        kind = "sh" if m.group("sh") else "python"
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = re.fullmatch(r"(```+)\s*(\w*)\s*", lines[j]) if j < len(lines) else None
        if not fence or fence.group(2) not in LANGS[kind]:
            raise ValueError(f"{name}:{i + 1}: {raw.strip()} must precede a ```{kind} block")
        end = j + 1
        while end < len(lines) and lines[end].strip() != fence.group(1):
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{j + 1}: code block is not closed")
        opts = m.group("opts").split()
        blocks.append(Block(kind, "\n".join(lines[j + 1 : end]) + "\n", i + 1, "slow" in opts))
    return blocks


def shrink(script: str, extra: str = SMALL_FLAGS) -> str:
    """Appends ``extra`` to every ``python -m experiments.`` command (before a trailing
    comment); backslash continuations are joined first."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        code, comment = re.fullmatch(r"(.*?)(\s+#.*)?", line).groups()
        if re.search(r"(^|\s)python3? -m experiments\.", code):
            code = code.rstrip() + " " + extra
        out.append(code + (comment or ""))
    return "\n".join(out) + "\n"


SRUN = textwrap.dedent('''\
    #!{python}
    """srun stand-in: runs the command once per task with a SLURM job step's environment,
    every task alone on its (here: the same) node."""
    import os, subprocess, sys
    args, n = sys.argv[1:], 1
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-n", "--ntasks"):
            n = int(args.pop(0))
        elif opt.startswith("--ntasks="):
            n = int(opt.split("=", 1)[1])
        elif "=" not in opt and opt in ("-N", "--nodes", "-c", "--cpus-per-task", "--gpus"):
            args.pop(0)
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n),
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="1", SLURM_LOCALID="0",
               JAX_COORDINATOR_PORT="{port}")
    procs = [subprocess.Popen(args, env=dict(env, SLURM_PROCID=str(i))) for i in range(n)]
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c), 0))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "_bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(SRUN.format(python=sys.executable, port=_free_port()))
    srun.chmod(0o755)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "XLA_FLAGS": flags,
           "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                   f"{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    if not flags:
        env.pop("XLA_FLAGS")
    return env


def _doc_blocks() -> list[Block]:
    with open(DOC, encoding="utf-8") as f:
        return parse_blocks(f.read(), os.path.relpath(DOC, REPO))


def _params():
    try:
        blocks = _doc_blocks()
    except (OSError, ValueError):
        return []  # test_doc_has_marked_blocks reports it
    name = os.path.relpath(DOC, REPO)
    return [pytest.param(b, id=f"{name}:{b.line}-{b.kind}",
                         marks=[pytest.mark.slow] if b.slow else []) for b in blocks]


def test_doc_has_marked_blocks():
    blocks = _doc_blocks()  # raises on a marker without its block
    kinds = {b.kind for b in blocks}
    assert "python" in kinds, f"no <!-- test --> python block in {DOC}"
    assert "sh" in kinds, f"no <!-- test:sh --> shell block in {DOC}"
    assert any(not b.slow for b in blocks if b.kind == "sh"), "every shell block is slow"


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, tmp_path, xla_cache):
    env = _env(tmp_path)
    if block.kind == "python":
        (tmp_path / "snippet.py").write_text(block.code)
        cmd = [sys.executable, "snippet.py"]
    else:
        script = shrink(block.code, f"{SMALL_FLAGS} --compilation-cache {xla_cache}")
        cmd = ["bash", "-eu", "-o", "pipefail", "-c", script]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200 if block.slow else 600, check=False)
    assert done.returncode == 0, (
        f"{os.path.relpath(DOC, REPO)}:{block.line} ({block.kind}) exited {done.returncode}\n"
        f"--- code\n{block.code}--- stdout\n{done.stdout[-3000:]}--- stderr\n{done.stderr[-3000:]}"
    )


# ----------------------------------------------------------------------------- the harness itself


SAMPLE = """\
text
<!-- test -->
```python
print(1)
```
<!-- test:sh slow -->

```sh
python -m experiments.digits_mlp --workdir runs/a   # trains
XLA_FLAGS=--x=1 python -m experiments.digits_mlp \\
  --parallel mesh
srun --ntasks 2 python -m experiments.digits_mlp
python -m jaxtrain.plot runs/a
```
```python
print("unmarked")
```
"""


def test_parse_blocks():
    blocks = parse_blocks(SAMPLE)
    assert [(b.kind, b.line, b.slow) for b in blocks] == [("python", 2, False), ("sh", 6, True)]
    assert blocks[0].code == "print(1)\n"
    with pytest.raises(ValueError, match="README.md:1: <!-- test:sh --> must precede a ```sh"):
        parse_blocks("<!-- test:sh -->\n```python\nx\n```\n")
    with pytest.raises(ValueError, match="not closed"):
        parse_blocks("<!-- test -->\n```python\nx\n")


def test_shrink_appends_small_flags_to_experiment_commands_only():
    (sh,) = [b for b in parse_blocks(SAMPLE) if b.kind == "sh"]
    assert shrink(sh.code, "--epochs 1").splitlines() == [
        "python -m experiments.digits_mlp --workdir runs/a --epochs 1   # trains",
        "XLA_FLAGS=--x=1 python -m experiments.digits_mlp    --parallel mesh --epochs 1",
        "srun --ntasks 2 python -m experiments.digits_mlp --epochs 1",
        "python -m jaxtrain.plot runs/a",
    ]


def test_module_map_names_every_module():
    """README's "Where things live" table names every module of ``jaxtrain``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("### Where things live", 1)[1].split("\n###", 1)[0]
    named = set(re.findall(r"`(\w+)/?`", table))
    package = os.path.join(REPO, "jaxtrain")
    modules = {name.removesuffix(".py") for name in os.listdir(package)
               if name.endswith(".py") and name != "__init__.py"}
    modules |= {name for name in os.listdir(package)
                if os.path.isfile(os.path.join(package, name, "__init__.py"))}
    assert modules - named == set()
    assert "loop" in named and "robustness" in named
