"""jaxtrain against plain PyTorch: the same models, data, batches and optimizer.

    python -m benchmarks.torch_peer                       # every suite, CPU defaults
    python -m benchmarks.torch_peer --suites cnn          # CNN variants only
    python -m benchmarks.torch_peer --suites resnet --resnet-dtype bfloat16 \\
        --peak-flops 989e12                               # on an H100

Suites (each side runs in its own process, measured side by side in one run and
reported as ratios jaxtrain / PyTorch):

- ``mlp``: digits MLP, whole training with the ``experiments.digits_mlp`` defaults
  (30 epochs, batch 64, Adam 2e-3, cosine), both from the same initial parameters
  and the same batch order, a validation pass every epoch and a test pass at the
  end. jaxtrain runs ``train_and_evaluate`` (compile, checkpoint and files included)
  with a cold and a warm compilation cache (the loop's defaults, so
  ``--steps-per-call`` auto) and with each ``--steps-per-call`` value; PyTorch runs
  eager at its best thread count. Two scopes, side by side: ``end_to_end_s``
  (jaxtrain: the whole ``train_and_evaluate`` call, data loading, init, compiles,
  checkpoints, files; PyTorch: data loading and model creation plus the loop) and
  ``train_eval_s``, like for like (the training loop with its per-epoch validation
  through the test evaluation; for jaxtrain that includes compiling the steps and
  the checkpoint saves made inside the loop). ``wall_s`` keeps its old meaning
  (jaxtrain end to end, PyTorch ``train_eval_s``). A floor comes with them
  (``steps_only``): the run's training steps alone, already compiled, one fused
  call (``fusing.fuse_steps``) per epoch; PyTorch's ``train_eval_s`` over it bounds
  the speedup any jaxtrain loop could show. ``--mlp-rounds`` rounds of warm-cache
  runs follow, a process each: jaxtrain's defaults, each ``--steps-per-call`` variant, then
  PyTorch; every jaxtrain run's ratio to its round's PyTorch run is kept
  (``warm_vs_torch_rounds``, the defaults' at the top level, each variant's under
  ``variants``).
- ``cnn``: MNIST-shape CNN (batch 128) training steps/s, jaxtrain variants
  (layout, precision, XLA flags, im2col convolution, matmul weight gradients, elementwise
  max-pool gradient) against PyTorch eager. A first round tries PyTorch's NCHW and
  channels_last layouts at each thread count; then each jaxtrain variant runs in
  lockstep with PyTorch's best setting (``common.run_lockstep``: both processes
  set up side by side, then their timed repeats alternate, one process at a time),
  and the variant's ratio is best over best within that pair, with the ratio of
  each repeat pair beside it. On this shared 2-core machine a slow spell lasts
  seconds to minutes (PyTorch alone measured 14-22 steps/s within one run), so
  ratios of runs a minute apart moved by 0.2-0.4.
- ``resnet``: ResNet-18 on CIFAR-shape data, images/s and MFU; PyTorch with
  autocast (bf16) on GPU, channels_last, fused Adam and ``torch.compile`` where a
  GPU is present (``--torch-compile``), once per ``--torch-compile-mode``; the
  ratio is to the fastest. On CPU, PyTorch's thread counts are tried first and
  its best runs in lockstep with jaxtrain, as in ``cnn``; on a GPU the children
  run one after the other (two processes would contend for its memory).

PyTorch is an optional dependency of the benchmarks only (``pip install torch``).
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common, throughput

SUITES = ("mlp", "cnn", "resnet")

def _on_cpu_devices(kind: str, n: int = 2, flags: str = "",
                    **changes: Any) -> tuple[dict[str, Any], str]:
    """A CNN variant: the loop's ``kind`` step over ``n`` XLA:CPU devices (as
    ``--cpu-devices n``), plus extra XLA ``flags`` and case ``changes``."""
    return ({"parallel": kind, "devices": n, **changes},
            f"--xla_force_host_platform_device_count={n} {flags}".strip())


YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
AUTO_VARIANT = "the loop's default (auto CPU devices)"
CONV_ENV = "JAXTRAIN_XLA_CPU_CONV"  # jaxtrain.compile_options.ENV (not imported: jax-free parent)

# jaxtrain CNN variants for the MNIST-shape comparison: name -> (case changes, XLA flags).
CNN_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "baseline (NHWC f32)": ({}, ""),
    # what a run with the loop's defaults gets: --cpu-devices auto's split on this host,
    # and --steps-per-call auto's K (_auto_cpu_devices_variant)
    AUTO_VARIANT: ({}, ""),
    # K steps per compiled call (fusing.fuse_steps), one device: --steps-per-call 4
    "4 steps per call": ({"steps_per_call": 4}, ""),
    "bf16": ({"dtype": "bfloat16"}, ""),
    "NCHW layout": ({"model": "cnn_nchw"}, ""),
    "im2col conv": ({"model": "cnn_im2col"}, ""),
    "onednn": ({}, "--xla_cpu_use_onednn=true"),
    "im2col + onednn": ({"model": "cnn_im2col"}, "--xla_cpu_use_onednn=true"),
    # the CNN before its elementwise max-pool gradient (jaxtrain.pooling)
    "select_and_scatter maxpool": ({"model": "cnn_xlapool"}, ""),
    "select_and_scatter maxpool + onednn": ({"model": "cnn_xlapool"}, "--xla_cpu_use_onednn=true"),
    "onednn fusions": ({}, "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    "xnn fusions": ({}, "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "im2col + xnn fusions": ({"model": "cnn_im2col"},
                             "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "xnnpack off": ({}, "--xla_cpu_use_xnnpack=false"),
    "single-thread eigen": ({}, "--xla_cpu_multi_thread_eigen=false"),
    "fast math": ({}, "--xla_cpu_enable_fast_math=true"),
    "onednn + single-thread eigen": (
        {}, "--xla_cpu_use_onednn=true --xla_cpu_multi_thread_eigen=false"),
    "onednn + single-thread eigen + fast math": (
        {}, ("--xla_cpu_use_onednn=true --xla_cpu_multi_thread_eigen=false "
             "--xla_cpu_enable_fast_math=true")),
    # data parallel over the cores: each core an XLA:CPU device, the loop's pmap / mesh step
    "2 CPU devices, pmap": _on_cpu_devices("pmap"),
    "2 CPU devices, mesh": _on_cpu_devices("mesh"),
    "2 CPU devices, pmap + single-thread eigen": _on_cpu_devices(
        "pmap", flags="--xla_cpu_multi_thread_eigen=false"),
    "2 CPU devices, mesh + single-thread eigen": _on_cpu_devices(
        "mesh", flags="--xla_cpu_multi_thread_eigen=false"),
    "2 CPU devices, pmap + onednn": _on_cpu_devices("pmap", flags="--xla_cpu_use_onednn=true"),
    "2 CPU devices, pmap + fast math": _on_cpu_devices(
        "pmap", flags="--xla_cpu_enable_fast_math=true"),
    "2 CPU devices, pmap, bf16": _on_cpu_devices("pmap", dtype="bfloat16"),
    "4 CPU devices, pmap": _on_cpu_devices("pmap", 4),
    # the loop's default for mnist_cnn before --cpu-devices auto stopped splitting single
    # runs (2026-12-07): a 2-device mesh with 29 steps per call
    "2 CPU devices, mesh, 29 steps per call": _on_cpu_devices("mesh", steps_per_call=29),
    # XLA:CPU's default convolutions (YNNPACK), which jaxtrain's jit programs leave for
    # Eigen's (jaxtrain.compile_options; pmap keeps them): the CNN's conv "auto" takes
    # the matmul weight gradients (jaxtrain.conv) on one CPU device there
    "YNNPACK convolutions + matmul weight grad": ({"env": {CONV_ENV: "xla"}}, ""),
    "YNNPACK convolutions": ({"model": "cnn_xlaconv", "env": {CONV_ENV: "xla"}}, ""),
    "matmul weight grad": ({"model": "cnn_mmgrad"}, ""),
    # every layer XLA's convolution (the baseline's first layer is a tap sum, conv_same)
    "XLA convolutions": ({"model": "cnn_xlaconv"}, ""),
    "2 CPU devices, mesh, XLA convolutions": _on_cpu_devices("mesh", model="cnn_xlaconv"),
    "2 CPU devices, mesh, YNNPACK convolutions": _on_cpu_devices(
        "mesh", env={CONV_ENV: "xla"}),
    "2 CPU devices, pmap + matmul weight grad": _on_cpu_devices("pmap", model="cnn_mmgrad"),
    "2 CPU devices, mesh + matmul weight grad": _on_cpu_devices("mesh", model="cnn_mmgrad"),
    "2 CPU devices, pmap + matmul weight grad + single-thread eigen": _on_cpu_devices(
        "pmap", flags="--xla_cpu_multi_thread_eigen=false", model="cnn_mmgrad"),
    "2 CPU devices, mesh + matmul weight grad + single-thread eigen": _on_cpu_devices(
        "mesh", flags="--xla_cpu_multi_thread_eigen=false", model="cnn_mmgrad"),
    # YNNPACK off altogether (dots and reductions too), the only way pmap gets Eigen's convs
    "YNNPACK off": ({"model": "cnn_xlaconv"}, YNN_OFF),
    # the CPU default before 2026-12-08: the first layer's weight gradient a matmul
    # (conv.conv_same), not Eigen's convolution (conv.conv_taps); one and 25 steps per call
    "first layer matmul weight grad": ({"model": "cnn_taps_mm"}, ""),
    "first layer matmul weight grad, 25 steps per call": (
        {"model": "cnn_taps_mm", "steps_per_call": 25}, ""),
    "2 CPU devices, pmap + YNNPACK off": _on_cpu_devices("pmap", flags=YNN_OFF),
}
# Not listed: --xla_cpu_use_thunk_runtime=false is ignored by jaxlib 0.10 ("no longer
# supported"); --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce returned NaN for
# a small conv + dot program there (wrong results, so not a speed option).
SMOKE_CNN_VARIANTS = ("baseline (NHWC f32)", "im2col conv")


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- PyTorch models


@functools.cache
def _torch_modules():
    """The PyTorch twins of ``jaxtrain.models`` (defined lazily: torch is optional)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Standardize(nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    class MLP(nn.Module):
        """Flatten, ReLU layers ``hidden``, linear head (as ``jaxtrain.models.MLP``)."""

        def __init__(self, in_shape_CHW, num_classes, mean, std, hidden=(256, 256)):
            super().__init__()
            self.norm = Standardize(mean, std)
            sizes = [int(torch.tensor(in_shape_CHW).prod()), *hidden]
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
            self.head = nn.Linear(sizes[-1], num_classes)

        def forward(self, x_BCHW):
            x = self.norm(x_BCHW).flatten(1)
            for layer in self.hidden:
                x = F.relu(layer(x))
            return self.head(x)

    class CNN(nn.Module):
        """conv3x3+ReLU+maxpool blocks, dense, head (as ``jaxtrain.models.CNN``)."""

        def __init__(self, in_shape_CHW, num_classes, mean, std, features=(32, 64), dense=128):
            super().__init__()
            self.norm = Standardize(mean, std)
            c, h, w = in_shape_CHW
            self.convs, self.pool = nn.ModuleList(), []
            for f in features:
                self.convs.append(nn.Conv2d(c, f, 3, padding=1))
                pool = min(h, w) >= 2
                self.pool.append(pool)
                c, h, w = f, (h // 2 if pool else h), (w // 2 if pool else w)
            self.flat_shape = (c, h, w)
            self.dense = nn.Linear(c * h * w, dense)
            self.head = nn.Linear(dense, num_classes)

        def forward(self, x_BCHW):
            x = self.norm(x_BCHW)
            for conv, pool in zip(self.convs, self.pool):
                x = F.relu(conv(x))
                if pool:
                    x = F.max_pool2d(x, 2)
            return self.head(F.relu(self.dense(x.flatten(1))))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
            nn.init.zeros_(self.bn2.weight)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu((x if self.short is None else self.short(x)) + y)

    class ResNet(nn.Module):
        """CIFAR-style ResNet (3x3 stem, no max-pool), as ``jaxtrain.models.ResNet``."""

        def __init__(self, in_shape_CHW, num_classes, mean, std, stage_sizes=(2, 2, 2, 2),
                     width=64):
            super().__init__()
            self.norm = Standardize(mean, std)
            self.stem = nn.Conv2d(in_shape_CHW[0], width, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
            blocks, cin = [], width
            for i, n in enumerate(stage_sizes):
                for j in range(n):
                    cout = width * 2**i
                    blocks.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, num_classes)

        def forward(self, x_BCHW):
            x = F.relu(self.bn(self.stem(self.norm(x_BCHW))))
            return self.head(self.blocks(x).mean(dim=(2, 3)))

    return {"mlp": MLP, "cnn": CNN, "resnet18": ResNet,
            "resnet_tiny": functools.partial(ResNet, stage_sizes=(1, 1), width=8)}


def create_torch_model(name: str, in_shape_HWC, num_classes: int, mean, std):
    """The PyTorch twin of registry model ``name`` for images ``[H, W, C]``."""
    base = name.removesuffix("_im2col").removesuffix("_nchw").removesuffix("_xlapool")
    h, w, c = in_shape_HWC
    return _torch_modules()[base]((c, h, w), num_classes, list(mean), list(std))


def load_flax_params(model, params: dict[str, Any]) -> None:
    """Copies flax ``params`` of an MLP or CNN into its PyTorch twin (same function).

    Dense kernels ``[in, out]`` become ``weight [out, in]``; conv kernels
    ``[kh, kw, in, out]`` become ``[out, in, kh, kw]``; the first dense layer
    after a flatten has its rows reordered from flax's (H, W, C) to (C, H, W)."""
    import numpy as np
    import torch

    def put(linear, p, reorder_chw=None):
        kernel = np.asarray(p["kernel"], np.float32)
        if reorder_chw is not None:
            c, h, w = reorder_chw
            kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        if kernel.ndim == 4:
            kernel = kernel.transpose(3, 2, 0, 1)
        else:
            kernel = kernel.T
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            linear.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))

    names = sorted(params, key=lambda n: (n.split("_")[0], int(n.split("_")[-1])))
    if hasattr(model, "convs"):  # CNN: Conv_0.., Dense_0 (hidden), Dense_1 (head)
        convs = [n for n in names if n.startswith("Conv_")]
        for layer, n in zip(model.convs, convs):
            put(layer, params[n])
        put(model.dense, params["Dense_0"], reorder_chw=model.flat_shape)
        put(model.head, params["Dense_1"])
    else:  # MLP: Dense_0..Dense_{n-1} hidden, last is the head (digits: C == 1, order kept)
        dense = [n for n in names if n.startswith("Dense_")]
        for layer, n in zip([*model.hidden, model.head], dense):
            put(layer, params[n])


def to_torch_images(images_NHWC, device, channels_last: bool = False):
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_NHWC.transpose(0, 3, 1, 2))).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def torch_cosine(opt, total_steps: int):
    """optax ``warmup_cosine_decay_schedule`` with no warmup: lr * (1 + cos(pi t / T)) / 2."""
    import math

    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )


def make_torch_step(model, opt, sched, *, amp_dtype=None, device_type="cpu"):
    """One eager training step ``step(x, y) -> loss`` (autocast when ``amp_dtype``)."""
    import torch
    import torch.nn.functional as F

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss

    return step


# ----------------------------------------------------------------------------- children


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_steps(case: dict[str, Any]) -> dict[str, Any]:
    """PyTorch training steps/s for ``case`` (as ``throughput.measure_case``), per thread count."""
    import numpy as np
    import torch

    from jaxtrain import data as data_lib

    config = throughput.train_config(case)
    dataset = throughput.load(config)
    device = _torch_device()
    bs = config.batch_size
    n = len(dataset.train["label"])
    channels_last = bool(case.get("channels_last"))
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(case.get("dtype", ""))
    x_all = to_torch_images(dataset.train["image"], device, channels_last)
    y_all = torch.from_numpy(dataset.train["label"].astype(np.int64)).to(device)
    idxs = [torch.from_numpy(np.resize(data_lib.batch_indices(0, s, n, bs), bs).astype(np.int64))
            .to(device) for s in range(4)]
    runs = []
    threads = case.get("threads") or [0]
    for nt in threads:
        if nt and device.type == "cpu":
            torch.set_num_threads(int(nt))
        torch.manual_seed(0)
        model = create_torch_model(case["model"], dataset.image_shape, dataset.num_classes,
                                   dataset.mean, dataset.std).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # fused Adam: one kernel for the whole update on a GPU, what a tuned loop uses
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type == "cuda")
        common.wait_turn()  # compile and first steps: one turn of a lockstep run
        t0 = time.perf_counter()
        mode = case.get("torch_compile_mode", "default")
        fwd = (torch.compile(model, mode=None if mode == "default" else mode)
               if case.get("torch_compile") else model)
        step_fn = make_torch_step(fwd, opt, None, amp_dtype=amp, device_type=device.type)
        counter = {"i": 0}

        def step(carry, step_fn=step_fn, counter=counter):
            counter["i"] += 1
            idx = idxs[counter["i"] % len(idxs)]
            return step_fn(x_all.index_select(0, idx), y_all.index_select(0, idx))

        loss = step(None)
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(2):
            loss = step(loss)
        _sync(device)
        if case.get("steps"):
            n_steps = int(case["steps"])
        else:
            common.wait_turn()
            t0 = time.perf_counter()
            loss = step(loss)
            _sync(device)
            n_steps = max(2, int(case.get("seconds", 2.0) / max(time.perf_counter() - t0, 1e-6)))
        loss, timing = common.time_steps(step, loss, n_steps, int(case.get("repeats", 3)),
                                         lambda _: _sync(device))
        runs.append({"threads": nt or torch.get_num_threads(), "first_call_s": first,
                     "timing": timing, "steps_per_s": 1.0 / timing["best_s_per_step"],
                     "loss_finite": bool(torch.isfinite(loss).item())})
    best = max(runs, key=lambda r: r["steps_per_s"])
    return {**case, "device": str(device), "runs": runs, "best_threads": best["threads"],
            "steps_per_s": best["steps_per_s"], "images_per_s": best["steps_per_s"] * bs,
            "param_count": sum(p.numel() for p in model.parameters()),
            "memory": common.torch_peak_memory()}


def digits_config(**changes):
    from experiments.digits_mlp import DEFAULTS

    return DEFAULTS.replace(**{"compilation_cache": "", "progress": "none", **changes})


def torch_train(case: dict[str, Any]) -> dict[str, Any]:
    """Whole digits-MLP training in PyTorch, as ``train_and_evaluate`` does it."""
    import numpy as np
    import sklearn.datasets  # noqa: F401  (imported outside the clock, as in jax_train)
    import torch

    from jaxtrain import data as data_lib
    from jaxtrain import program

    config = digits_config(epochs=case["epochs"])
    t_setup = time.perf_counter()
    dataset = data_lib.load_dataset(config.dataset, val_fraction=config.val_fraction)
    load_s = time.perf_counter() - t_setup
    n = len(dataset.train["label"])
    per_epoch = data_lib.steps_per_epoch(n, config.batch_size)
    total = per_epoch * config.epochs
    host_state = program.build_model_and_state(config, dataset, total)
    order = np.stack([data_lib.batch_indices(config.seed, s, n, config.batch_size)
                      for s in range(total)]).astype(np.int64)
    device = _torch_device()
    t_setup = time.perf_counter()
    split = {name: (to_torch_images(s["image"], device),
                    torch.from_numpy(s["label"].astype(np.int64)).to(device))
             for name, s in (("train", dataset.train), ("val", dataset.val),
                             ("test", dataset.test))}
    order_t = torch.from_numpy(order).to(device)
    load_s += time.perf_counter() - t_setup
    runs = []
    for nt in case.get("threads") or [0]:
        if nt and device.type == "cpu":
            torch.set_num_threads(int(nt))
        t_setup = time.perf_counter()
        model = create_torch_model(config.model, dataset.image_shape, dataset.num_classes,
                                   dataset.mean, dataset.std).to(device)
        # (its own random init; the copied flax parameters below only make runs comparable)
        init_s = time.perf_counter() - t_setup
        load_flax_params(model, host_state.params)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        step = make_torch_step(model, opt, torch_cosine(opt, total), device_type=device.type)

        def accuracy(name, model=model):
            x, y = split[name]
            with torch.no_grad():
                correct = sum(int((model(x[i:i + config.eval_batch_size]).argmax(-1)
                                   == y[i:i + config.eval_batch_size]).sum())
                              for i in range(0, len(y), config.eval_batch_size))
            return correct / len(y)

        x_tr, y_tr = split["train"]
        t0 = time.perf_counter()
        for s in range(total):
            idx = order_t[s]
            loss = step(x_tr.index_select(0, idx), y_tr.index_select(0, idx))
            if (s + 1) % per_epoch == 0:
                float(loss)
                accuracy("val")
        _sync(device)
        t_train = time.perf_counter() - t0
        test_acc = accuracy("test")
        train_eval = time.perf_counter() - t0
        runs.append({"threads": nt or torch.get_num_threads(), "wall_s": train_eval,
                     "train_eval_s": train_eval, "setup_s": load_s + init_s,
                     "load_s": load_s, "init_s": init_s,
                     "end_to_end_s": load_s + init_s + train_eval,
                     "train_loop_s": t_train, "steps_per_s": total / t_train,
                     "test_accuracy": test_acc})
    best = min(runs, key=lambda r: r["wall_s"])
    return {**case, "runs": runs, "best_threads": best["threads"], "wall_s": best["wall_s"],
            "train_eval_s": best["train_eval_s"], "setup_s": best["setup_s"],
            "end_to_end_s": best["end_to_end_s"],
            "steps_per_s": best["steps_per_s"], "test_accuracy": best["test_accuracy"],
            "steps": total, "memory": common.torch_peak_memory()}


def jax_train(case: dict[str, Any]) -> dict[str, Any]:
    """Whole digits-MLP training with ``train_and_evaluate`` (files and checkpoint included).

    Besides the end-to-end wall it splits the call at two marks: the loop starts
    right after ``train_and_evaluate`` builds its progress display (patched here to
    note the time), and the test evaluation is done when the test metrics reach the
    writer. ``setup_s`` comes before (data, init, checkpoint manager, config.json and
    writers), ``train_eval_s`` between (the steps and their compiles, per-epoch
    validation, checkpoint saves, the final evaluation), ``finish_s`` after (waiting
    for the last checkpoint, closing files, summary.json)."""
    from jaxtrain import loop
    from jaxtrain.loop import train_and_evaluate

    marks: dict[str, float] = {}

    class MarkedProgress(loop.Progress):
        def __init__(self, *args, **kwargs):
            marks.setdefault("loop_start", time.perf_counter())
            super().__init__(*args, **kwargs)

    class TestMark:
        def write(self, step, split, metrics):
            if split == "test":
                marks["test_done"] = time.perf_counter()

        def close(self):
            pass

    loop.Progress = MarkedProgress

    changes = {"epochs": case["epochs"], "compilation_cache": case.get("cache", "")}
    if "steps_per_call" in case:  # else the default (auto)
        changes["steps_per_call"] = case["steps_per_call"]
    config = digits_config(**changes)
    # Library imports are outside the clock on both sides (the PyTorch child imports torch
    # first). The loop imports these lazily; tensorboardX imports torch when it is installed.
    t0 = time.perf_counter()
    import importlib.util

    import sklearn.datasets  # noqa: F401

    if importlib.util.find_spec("tensorboardX"):
        import tensorboardX  # noqa: F401
    lazy_imports_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        summary = train_and_evaluate(config, workdir, writer=TestMark())
        wall = time.perf_counter() - t0
    split = {}
    if {"loop_start", "test_done"} <= set(marks):
        split = {"setup_s": marks["loop_start"] - t0,
                 "train_eval_s": marks["test_done"] - marks["loop_start"],
                 "finish_s": t0 + wall - marks["test_done"]}
    return {**case, "wall_s": wall, "end_to_end_s": wall, **split,
            "lazy_imports_s": lazy_imports_s, "steps_per_s": summary["train_steps_per_sec"],
            "test_accuracy": summary["test_accuracy"], "steps": summary["steps"]}


def jax_steps_only(case: dict[str, Any]) -> dict[str, Any]:
    """The floor under any jaxtrain loop: the whole run's training steps and nothing else.

    Same initial state, batch order and step as ``train_and_evaluate``, one fused
    call (``fusing.fuse_steps``) per epoch over device-resident data, already compiled:
    no evaluation, checkpoint, metrics or compile. ``steps_only_s`` is the best of
    ``repeats`` passes over every step of the run; no loop around these steps can
    train in less. Beside it, this CPU's f32 matmul rate (a 1024^3 dot) puts the
    step's achieved GFLOP/s in context."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain import data as data_lib
    from jaxtrain import fusing, profiling, program

    config = digits_config(epochs=case["epochs"])
    dataset = data_lib.load_dataset(config.dataset, val_fraction=config.val_fraction)
    n = len(dataset.train["label"])
    per_epoch = data_lib.steps_per_epoch(n, config.batch_size)
    total = per_epoch * config.epochs
    host_state = program.build_model_and_state(config, dataset, total)
    update = program.make_update(config, resident=True)
    epoch = jax.jit(fusing.fuse_steps(update, per_epoch, resident=True), donate_argnums=(0,))
    data = jax.device_put(dataset.train)
    key = jax.device_put(program.step_key(config.seed))
    order = [jax.device_put(np.stack([data_lib.batch_indices(config.seed, s, n, config.batch_size)
                                      for s in range(e * per_epoch, (e + 1) * per_epoch)]))
             for e in range(config.epochs)]

    def run_all():
        state = jax.device_put(host_state)
        for idx in order:
            state, metrics = epoch(state, data, idx, np.int32(per_epoch), key)
        return jax.block_until_ready((state, metrics))

    _, metrics = run_all()  # compiles
    times = []
    for _ in range(int(case.get("repeats", 3))):
        t0 = time.perf_counter()
        run_all()
        times.append(time.perf_counter() - t0)
    flops = profiling.model_flops(update, host_state, dataset.train,
                                  order[0][0], program.step_key(config.seed))
    a = jnp.ones((1024, 1024), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    jax.block_until_ready(dot(a))
    t0 = time.perf_counter()
    for _ in range(10):
        out = dot(a)
    jax.block_until_ready(out)
    matmul_flops_per_s = 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    best = min(times)
    return {**case, "steps": total, "steps_only_s": best, "times_s": times,
            "steps_per_s": total / best, "final_loss": float(metrics["loss"][-1]),
            "model_flops_per_step": flops,
            "achieved_flops_per_s": flops * total / best if flops else None,
            "matmul_1024_flops_per_s": matmul_flops_per_s,
            "memory": common.peak_memory()}


def register_benchmark_models() -> None:
    """Adds ``cnn_im2col`` (``CNN(conv="im2col")``), ``cnn_nchw`` (the CNN with NCHW
    convolutions), ``cnn_xlapool`` (``CNN(pool="xla")``: ``nn.max_pool``, whose
    gradient is ``select_and_scatter``), ``cnn_xlaconv`` and ``cnn_mmgrad`` (``conv``
    ``"xla"`` and ``"matmul_grad"`` whatever the device count) and ``cnn_taps_mm``
    (``conv=("taps", "nhwc_vjp")``: the CPU default before 2026-12-08, the first
    layer's weight gradient a matmul) to the model registry of this (child) process."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxtrain import models
    from jaxtrain.pooling import max_pool_2x2

    if "cnn_nchw" in models.MODELS:
        return
    models.MODELS["cnn_im2col"] = functools.partial(models.CNN, conv="im2col")
    models.MODELS["cnn_xlapool"] = functools.partial(models.CNN, pool="xla")
    models.MODELS["cnn_xlaconv"] = functools.partial(models.CNN, conv="xla")
    models.MODELS["cnn_mmgrad"] = functools.partial(models.CNN, conv="matmul_grad")
    models.MODELS["cnn_taps_mm"] = functools.partial(models.CNN, conv=("taps", "nhwc_vjp"))

    class ConvNCHW(nn.Module):
        features: int
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x_BCHW):
            c = x_BCHW.shape[1]
            k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
            b = self.param("bias", nn.initializers.zeros, (self.features,))
            y = jax.lax.conv_general_dilated(
                x_BCHW.astype(self.dtype), k.astype(self.dtype), (1, 1), "SAME",
                dimension_numbers=("NCHW", "HWIO", "NCHW"))
            return y + b.astype(self.dtype).reshape((1, -1, 1, 1))

    class CNNNCHW(models.CNN):
        """``models.CNN`` computed in NCHW (benchmark only)."""

        @nn.compact
        def __call__(self, x_BHWC, train: bool = False):
            x = models.Standardize(self.mean, self.std)(x_BHWC).astype(self.dtype)
            x = jnp.transpose(x, (0, 3, 1, 2))
            for f in self.features:
                x = nn.relu(ConvNCHW(f, self.dtype)(x))
                if min(x.shape[2:4]) >= 2:
                    x = max_pool_2x2(x.transpose(0, 2, 3, 1))  # as models.CNN
                    x = x.transpose(0, 3, 1, 2)
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
            return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)

    models.MODELS["cnn_nchw"] = CNNNCHW


def jax_steps(case: dict[str, Any]) -> dict[str, Any]:
    register_benchmark_models()
    return throughput.measure_case(case)


CHILDREN = {"torch_steps": torch_steps, "torch_train": torch_train,
            "jax_train": jax_train, "jax_steps": jax_steps, "jax_steps_only": jax_steps_only}


def child(case: dict[str, Any]) -> dict[str, Any]:
    return CHILDREN[case.pop("kind")](case)


# ----------------------------------------------------------------------------- suites


def _run(kind: str, case: dict[str, Any], args, env: dict[str, str] | None = None):
    return common.run_case("benchmarks.torch_peer", {"kind": kind, **case}, env=env,
                           timeout=args.timeout)


def _paired(jax_result: dict[str, Any], torch_result: dict[str, Any]) -> list[float]:
    """jaxtrain over PyTorch per repeat pair of one lockstep run (``[]`` if either failed)."""
    if "timing" not in jax_result or not torch_result.get("runs"):
        return []
    return common.paired_ratios(jax_result["timing"], torch_result["runs"][0]["timing"])


def suite_mlp(args, threads) -> dict[str, Any]:
    epochs = 2 if args.smoke else args.epochs
    cache = tempfile.mkdtemp(prefix="jaxtrain-bench-cache-")
    jax_runs = {
        "jaxtrain, cold compile cache": _run("jax_train", {"epochs": epochs, "cache": cache}, args),
    }
    for k in args.steps_per_call:  # compiles each variant's step into the cache
        jax_runs[f"jaxtrain, steps-per-call {k}, cold cache"] = _run(
            "jax_train", {"epochs": epochs, "cache": cache, "steps_per_call": k}, args)
    # Rounds of warm-cache runs, a process each, seconds apart: jaxtrain's defaults, each
    # --steps-per-call variant, then PyTorch; --mlp-rounds of them. Every jaxtrain run's
    # ratio is taken against its round's PyTorch run, so a slow spell of this shared
    # machine counts on both sides; the first round is the table's.
    variants = {"jaxtrain, warm compile cache": {}}
    variants.update({f"jaxtrain, steps-per-call {k}, warm cache": {"steps_per_call": k}
                     for k in args.steps_per_call})
    played = []
    for _ in range(max(args.mlp_rounds, 1)):
        runs = {name: _run("jax_train", {"epochs": epochs, "cache": cache, **extra}, args)
                for name, extra in variants.items()}
        played.append((runs, _run("torch_train", {"epochs": epochs, "threads": threads}, args)))
    jax_runs.update(played[0][0])
    torch_run = played[0][1]
    floor = _run("jax_steps_only", {"epochs": epochs}, args)

    def versus(j, t):
        return {"jax_train_eval_s": j.get("train_eval_s"),
                "torch_train_eval_s": t.get("train_eval_s"),
                "speedup_vs_torch_train_eval": common.ratio(t.get("train_eval_s"),
                                                            j.get("train_eval_s")),
                "speedup_vs_torch_end_to_end": common.ratio(t.get("end_to_end_s"),
                                                            j.get("end_to_end_s"))}

    rounds = [{**versus(runs["jaxtrain, warm compile cache"], t),
               "variants": {name: versus(j, t) for name, j in runs.items()}}
              for runs, t in played]
    rows, out = [], []
    for name, r in [*jax_runs.items(), ("pytorch eager", torch_run)]:
        speedup = common.ratio(torch_run.get("wall_s"), r.get("wall_s"))
        end_to_end = common.ratio(torch_run.get("end_to_end_s"), r.get("end_to_end_s"))
        train_eval = common.ratio(torch_run.get("train_eval_s"), r.get("train_eval_s"))
        out.append({"name": name, **r, "speedup_vs_torch_wall": speedup,
                    "speedup_vs_torch_end_to_end": end_to_end,
                    "speedup_vs_torch_train_eval": train_eval,
                    "steps_per_s_ratio_vs_torch": common.ratio(r.get("steps_per_s"),
                                                               torch_run.get("steps_per_s"))})
        rows.append([name, r.get("end_to_end_s"), end_to_end, r.get("setup_s"),
                     r.get("train_eval_s"), train_eval, r.get("steps_per_s"),
                     r.get("test_accuracy"), "error" if "error" in r else ""])
    # The bound: PyTorch's train_eval over the steps alone, the most any loop could reach.
    bound = common.ratio(torch_run.get("train_eval_s"), floor.get("steps_only_s"))
    rows.append(["jaxtrain steps only (floor)", None, None, None, floor.get("steps_only_s"),
                 bound, floor.get("steps_per_s"), None, "error" if "error" in floor else ""])
    for name in variants:
        paired = [r["variants"][name]["speedup_vs_torch_train_eval"] for r in rounds
                  if r["variants"][name]["speedup_vs_torch_train_eval"]]
        if paired:
            print(f"{name} against PyTorch, {len(paired)} round(s): train_eval speedup "
                  f"{min(paired):.2f}-{max(paired):.2f}, median {statistics.median(paired):.2f}")
    flops_s = floor.get("achieved_flops_per_s")
    matmul_s = floor.get("matmul_1024_flops_per_s")
    print(f"steps only: {floor.get('steps', '?')} steps in {floor.get('steps_only_s', 0):.3f} s "
          f"(one fused call per epoch, data resident, compiled before timing), "
          f"{(flops_s or 0) / 1e9:.1f} GFLOP/s against {(matmul_s or 0) / 1e9:.1f} GFLOP/s for "
          f"a 1024^3 f32 matmul on this CPU: no jaxtrain loop can beat PyTorch's train_eval by "
          f"more than {bound or float('nan'):.2f}x here")
    common.print_table(
        f"digits MLP, whole training ({epochs} epochs, batch 64): jaxtrain vs PyTorch eager "
        f"(best of threads {threads}). end_to_end: jaxtrain's whole train_and_evaluate, "
        "PyTorch's data loading + model creation + loop; train_eval (like for like): the "
        "training loop with per-epoch validation through the test evaluation (jaxtrain's "
        "includes its step compiles and checkpoint saves); speedup = PyTorch s / run s",
        ["run", "end_to_end_s", "speedup_e2e", "setup_s", "train_eval_s", "speedup_train_eval",
         "steps/s", "test_acc", ""], rows)
    return {"epochs": epochs, "runs": out, "warm_vs_torch_rounds": rounds,
            "steps_only": {**floor, "speedup_bound_vs_torch_train_eval": bound}}


MNIST_TRAIN = 60_000  # MNIST's train split, before the loop holds out validation


def _auto_cpu_devices_variant(base: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``AUTO_VARIANT`` on this host: the split ``--cpu-devices 0`` makes for ``base``
    (its data's image shape), or one device where it makes none, with the steps per
    call ``--steps-per-call 0`` fuses there over ``mnist_cnn``'s default run on MNIST
    (timed here with every call running all of them)."""
    from experiments.mnist_cnn import DEFAULTS  # imports jax, starts nothing
    from jaxtrain import data as data_lib
    from jaxtrain import fusing
    from jaxtrain.cpu_devices import resolve_cpu_devices

    config = DEFAULTS.replace(model=base["model"], batch_size=base["batch_size"])
    n = resolve_cpu_devices(config, throughput.SHAPES[base.get("data", "mnist")])
    per_epoch = data_lib.steps_per_epoch(
        MNIST_TRAIN - data_lib.holdout_count(MNIST_TRAIN, config.val_fraction), config.batch_size)
    k = fusing.auto_steps_per_call(config, "cpu", "mesh" if n > 1 else "none", False, per_epoch)
    changes = {"steps_per_call": k} if k > 1 else {}
    return _on_cpu_devices("mesh", n, **changes) if n > 1 else (changes, "")


def suite_cnn(args, threads, platform: str) -> dict[str, Any]:
    base = {"model": "cnn", "data": "mnist", "batch_size": args.cnn_batch_size,
            "seconds": args.seconds, "repeats": args.repeats, "synthetic_size": 2048}
    if args.smoke:
        base.update(batch_size=16, steps=2, repeats=1, synthetic_size=256)
    variants = {k: v for k, v in CNN_VARIANTS.items() if not args.cnn_variants
                or k in args.cnn_variants}
    if platform != "cpu":  # XLA:CPU flags and CPU devices do nothing there
        variants = {k: v for k, v in variants.items()
                    if "xla_cpu" not in v[1] and "host_platform" not in v[1]}
    if args.smoke and not args.cnn_variants:
        variants = {k: variants[k] for k in SMOKE_CNN_VARIANTS if k in variants}
    torch_cases = {"pytorch eager NCHW": {}, "pytorch eager channels_last":
                   {"channels_last": True}}

    def torch_round(cases, nthreads):
        return {name: _run("torch_steps", {**base, **torch_cases[name], "threads": nthreads},
                           args) for name in cases}

    # The first round tries every layout and thread count; then each variant runs in
    # lockstep with PyTorch's best setting (common.run_lockstep): their timed repeats
    # alternate, seconds apart, so a slow spell of this shared machine (minutes long;
    # PyTorch alone measured 14-22 steps/s across one run) hits both alike.
    rounds = [torch_round(torch_cases, threads)]
    best_name, best = max(((n, r) for n, r in rounds[0].items() if r.get("steps_per_s")),
                          key=lambda nr: nr[1]["steps_per_s"], default=(None, {}))
    torch_case = ({"kind": "torch_steps", **base, **torch_cases[best_name],
                   "threads": [best["best_threads"]]} if best_name else None)
    rows, out = [], []
    for name, (changes, flags) in variants.items():
        if name == AUTO_VARIANT and platform == "cpu":
            changes, flags = _auto_cpu_devices_variant(base)
        changes = dict(changes)
        env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
               **changes.pop("env", {})}
        shown = " ".join([*(f"{k}={v}" for k, v in env.items() if k != "XLA_FLAGS"), flags])
        jax_case = {"kind": "jax_steps", **base, **changes, "xla_flags": shown.strip()}
        if torch_case is None:  # no PyTorch figure to pair with: jaxtrain alone
            r, tr = _run(jax_case.pop("kind"), jax_case, args, env=env), {}
        else:
            r, tr = common.run_lockstep("benchmarks.torch_peer",
                                        [(jax_case, env), (dict(torch_case), None)],
                                        timeout=args.timeout)
            rounds.append({best_name: tr})
        ref = tr.get("steps_per_s")
        pairs = _paired(r, tr)
        rel = common.ratio(r.get("steps_per_s"), ref)
        mid = statistics.median(pairs) if pairs else None
        out.append({"name": name, **r, "torch_ref_steps_per_s": ref, "ratio_vs_torch": rel,
                    "paired_ratios": pairs, "ratio_vs_torch_median_of_pairs": mid})
        rows.append([name, r.get("xla_flags", ""), r.get("steps_per_s"), ref, rel, mid,
                     f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "",
                     r.get("cpu_s_per_step"), r.get("compile_s"), r.get("first_loss"),
                     "error" if "error" in r or "error" in tr else ""])
    for name in torch_cases:
        vals = [rnd[name]["steps_per_s"] for rnd in rounds
                if rnd.get(name, {}).get("steps_per_s")]
        rows.append([name, f"threads {threads}", max(vals) if vals else None, None, None, None,
                     "", None, None, None, ""])
    common.print_table(
        f"MNIST-shape CNN, batch {base['batch_size']}: training steps/s, jaxtrain variant vs "
        "PyTorch eager (its best setting, run in lockstep with each variant: repeats "
        "alternate). ratio: best over best; pairs: per repeat pair, median and range",
        ["variant", "xla_flags", "steps/s", "torch_steps/s", "ratio", "pairs_median",
         "pairs_range", "cpu_s/step", "compile_s", "first_loss", ""], rows)
    return {"batch_size": base["batch_size"], "variants": out, "torch_rounds": rounds,
            "torch_best": {"setting": best_name,
                           "threads": [best["best_threads"]] if best_name else threads}}


def suite_resnet(args, threads, platform: str) -> dict[str, Any]:
    on_gpu = platform != "cpu"
    dtype = args.resnet_dtype or ("bfloat16" if on_gpu else "float32")
    bs = args.resnet_batch_size or (256 if on_gpu else 32)
    base = {"model": "resnet18", "data": "cifar", "batch_size": bs, "dtype": dtype,
            "seconds": args.seconds, "repeats": args.repeats, "synthetic_size": 4096}
    if not on_gpu:
        base["steps"] = args.resnet_steps
    if args.smoke:
        base.update(model="resnet_tiny", batch_size=16, steps=2, repeats=1, synthetic_size=256)
    compile_torch = args.torch_compile == "on" or (args.torch_compile == "auto" and on_gpu)
    jax_case = {**base, "peak_flops": args.peak_flops}
    torch_cases = [{**base, "threads": threads, "channels_last": True,
                    "torch_compile": compile_torch, "torch_compile_mode": mode}
                   for mode in (args.torch_compile_mode if compile_torch else ["default"])]
    if on_gpu:  # one child at a time: two processes would contend for GPU memory
        jr = _run("jax_steps", jax_case, args)
        torch_runs = [_run("torch_steps", case, args) for case in torch_cases]
    else:  # as the cnn suite: PyTorch's thread counts first, then the best in lockstep
        first = _run("torch_steps", torch_cases[0], args) if len(threads) > 1 else {}
        best_threads = [first.get("best_threads") or max(threads)]
        jr, *torch_runs = common.run_lockstep(
            "benchmarks.torch_peer", [({"kind": "jax_steps", **jax_case}, None),
                                      *(({"kind": "torch_steps", **c, "threads": best_threads},
                                         None) for c in torch_cases)], timeout=args.timeout)
        for tr in torch_runs:
            tr["paired_ratios"] = _paired(jr, tr)
            tr["threads_round"] = first
    flops = jr.get("flops_per_step")
    for tr in torch_runs:  # one per torch.compile mode; the best is the reference
        mode = tr.get("torch_compile_mode", "default")
        tr["name"] = ("pytorch " + ("autocast bf16, " if dtype == "bfloat16" else "")
                      + "channels_last" + (f", torch.compile {mode}" if compile_torch
                                           else ", eager")
                      + (", fused Adam" if on_gpu else ""))
    for r in (jr, *torch_runs):
        r["flops_per_s"] = flops * r["steps_per_s"] if flops and r.get("steps_per_s") else None
        r["mfu"] = (r["flops_per_s"] / args.peak_flops
                    if args.peak_flops and r["flops_per_s"] else None)
    tr = max(torch_runs, key=lambda r: r.get("images_per_s") or 0)
    rel = common.ratio(jr.get("images_per_s"), tr.get("images_per_s"))
    rows = [["jaxtrain " + dtype, jr.get("images_per_s"), jr.get("mfu"), rel,
             common.mib((jr.get("memory") or {}).get("device_peak_bytes")),
             "error" if "error" in jr else ""]]
    rows += [[r["name"], r.get("images_per_s"), r.get("mfu"),
              common.ratio(r.get("images_per_s"), tr.get("images_per_s")),
              common.mib((r.get("memory") or {}).get("device_peak_bytes")),
              "error" if "error" in r else ""] for r in torch_runs]
    pairs = tr.get("paired_ratios")
    common.print_table(
        f"{base['model']} CIFAR-shape, batch {base['batch_size']}: images/s "
        f"(MFU against {args.peak_flops or '-'} FLOP/s, model FLOPs from XLA), ratio to the "
        "best PyTorch run" + (f" (in lockstep; per repeat pair {min(pairs):.2f}-"
                              f"{max(pairs):.2f}, median {statistics.median(pairs):.2f})"
                              if pairs else ""),
        ["run", "images/s", "MFU", "ratio_vs_torch", "dev_peak_MiB", ""], rows)
    return {"jaxtrain": jr, "pytorch": tr, "pytorch_runs": torch_runs, "ratio_images_per_s": rel}


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--suites", type=common.str_list, default=list(SUITES))
    p.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",") if v], default=None,
                   help="PyTorch CPU thread counts to try (default: 1..cores, doubling)")
    p.add_argument("--epochs", type=int, default=30, help="digits MLP epochs")
    p.add_argument("--mlp-rounds", type=int, default=3,
                   help="mlp suite: rounds of warm-cache runs (jaxtrain variants, then PyTorch)")
    p.add_argument("--steps-per-call", type=lambda s: [int(v) for v in s.split(",") if v],
                   default=[1], help="--steps-per-call values to also run in the mlp suite "
                   "(its default runs use the loop's default, auto; 1 = one step per call)")
    p.add_argument("--cnn-batch-size", type=int, default=128)
    p.add_argument("--cnn-variants", type=lambda s: [v for v in s.split(";") if v], default=None,
                   help=f"';'-separated subset of {list(CNN_VARIANTS)}")
    p.add_argument("--resnet-batch-size", type=int, default=None)
    p.add_argument("--resnet-dtype", default=None)
    p.add_argument("--resnet-steps", type=int, default=3, help="timed resnet steps on CPU")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--torch-compile-mode", type=common.str_list, default=["default"],
                   help="comma-separated torch.compile modes for the resnet suite, each run "
                        "in its own process (default, reduce-overhead = CUDA graphs, "
                        "max-autotune); the fastest is the reference")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return common.child_main(child, args.child)
    if not have_torch():
        print("error: PyTorch is not installed (pip install torch); it is only needed "
              "for this benchmark", file=sys.stderr)
        return 2
    info = common.machine_info(args.note)
    cores = info["cpu_cores"]
    threads = args.threads or sorted({min(2**i, cores) for i in range(cores.bit_length())})
    if info["platform"] != "cpu":
        threads = [0]  # the GPU run does not depend on it
    payload: dict[str, Any] = {"torch_threads_tried": threads}
    for suite in args.suites:
        if suite == "mlp":
            payload["mlp"] = suite_mlp(args, threads)
        elif suite == "cnn":
            payload["cnn"] = suite_cnn(args, threads, info["platform"])
        elif suite == "resnet":
            payload["resnet"] = suite_resnet(args, threads, info["platform"])
        else:
            print(f"error: unknown suite {suite!r}; choose from {SUITES}", file=sys.stderr)
            return 2
    common.write_results("torch_peer", args, info, payload)
    return 1 if _has_error(payload) else 0


def _has_error(tree: Any) -> bool:
    if isinstance(tree, dict):
        return "error" in tree or any(_has_error(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_error(v) for v in tree)
    return False


if __name__ == "__main__":
    sys.exit(main())
