#!/usr/bin/env bash
# One GPU check: the fast tests and the benchmarks, every figure and the device to $OUT.
#
#   OUT=/path PYTHONPATH=. bash benchmarks/gpu_check.sh     # a GPU machine: about 6 minutes
#   SMOKE=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh         # anywhere, tiny sizes: a few minutes
#
# Needs python3 (or $PYTHON) with jax (CUDA), flax, optax, orbax-checkpoint, chex,
# scikit-learn, matplotlib and PyTorch. Not needed: tensorflow-datasets (tests that
# need it skip), pytest-xdist (used when present), tensorboardX.
#
# Steps (each time-boxed; a failed step is recorded and the rest still run):
#   phase A, the fast tests on the CPU (as conftest.py sets) alongside GPU-bound work:
#     tests        pytest -m "not slow" -x -q
#     throughput   MLP digits, CNN MNIST-shape (f32), ResNet-18 CIFAR-shape (bf16): steps/s,
#                  images/s, MFU against $PEAK_FLOPS (H100/H200 bf16 dense: 989e12)
#     fused_steps  ResNet-18 again with 4 steps per call (fusing.fuse_steps: a fori_loop)
#     pipeline     host pipeline vs device-resident vs synthetic batches
#   phase B, nothing else running:
#     torch_resnet ResNet-18 CIFAR-shape bf16 vs PyTorch (autocast bf16, channels_last,
#                  fused Adam, torch.compile default and reduce-overhead) in the same run
#     tta          digits MLP time to 97% test accuracy, cold and warm compile cache,
#                  on the GPU and on this machine's CPU cores (JAX_PLATFORMS=cpu)
#     seeds        1 and 32 digits MLPs, each in one program (target: 32 cost well under 2x one)
#     cpu_throughput  the same MLP and CNN steps on the CPU cores: GPU vs CPU per step
#     cpu_cores    the CNN data-parallel over one CPU device per core (up to 16)
#     profile      ResNet-18 bf16 through the training loop with --profile-steps: the
#                  trace's top ops and the GPU's busy fraction (jaxtrain.trace_summary)
#
# $OUT gets three files: summary.json (device, every figure, each step's status and
# time), gpu_check.log (all output) and raw.tar.gz (each benchmark's own JSON and log).
# Commit summary.json as benchmarks/results/gpu_check-<gpu>.json. Exit status 0 when
# every step passed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET_S:-350}   # seconds for everything; phase B steps shrink to fit
[[ "$SMOKE" == 1 ]] && BUDGET=${BUDGET_S:-900}  # a loaded CPU: let every step run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BENCH_NOTE=${BENCH_NOTE:-"benchmarks/gpu_check.sh SMOKE=$SMOKE"}
mkdir -p "$OUT"
RAW=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$RAW/steps.txt"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME LIMIT_S CMD... : runs CMD with a time limit, output to $RAW/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== [$(elapsed)s] $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$RAW/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$RAW/steps.txt"
  echo "=== [$(elapsed)s] $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  return 0
}
# remaining LIMIT: the smaller of LIMIT and what is left of the budget (at least 20 s)
remaining() { local left=$(( BUDGET - $(elapsed) )); (( left < 20 )) && left=20; (( left < $1 )) && echo "$left" || echo "$1"; }

# --- device -------------------------------------------------------------------------------
{ echo "=== device"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"; } >> "$LOG"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [[ -z "${PEAK_FLOPS:-}" ]]; then
  case "$GPU_NAME" in
    *H100*|*H200*|*GH200*) PEAK_FLOPS=989e12 ;;   # bf16 dense, SXM
    *A100*) PEAK_FLOPS=312e12 ;;
    *) PEAK_FLOPS= ;;
  esac
fi
PEAK_ARGS=(); [[ -n "$PEAK_FLOPS" ]] && PEAK_ARGS=(--peak-flops "$PEAK_FLOPS")
PLATFORM=$("$PY" -c "import jax; print(jax.default_backend())" 2>>"$LOG")
echo "=== gpu: ${GPU_NAME:-none}; jax backend: ${PLATFORM:-?}; peak: ${PEAK_FLOPS:-none}; smoke: $SMOKE" | tee -a "$LOG"
HAVE_TORCH=$("$PY" -c "import torch; print(1)" 2>/dev/null || echo 0)
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)

if [[ "$SMOKE" == 1 ]]; then
  S=(--smoke)
  TORCH_ARGS=(--threads 1)
  TESTS=(-m "not slow" -x -q -p no:cacheprovider tests/test_benchmarks.py -k "call_plan or unstack or write_results or round_trip")
  XDIST=()
  TP_CASES=mlp:digits
  FUSED_CASES=mlp:digits
  PIPE_CASES=mlp:digits
  TTA_PLATFORMS=default
  CPU_CASES=mlp:digits
  CORE_CASES=mlp:digits
  SEEDS=(--seeds 1,2 --epochs 1)
  PROFILE=(-m experiments.digits_mlp --epochs 1 --profile-steps 2:4)
  LIM_TESTS=120; LIM_A=200; LIM_B=200
else
  S=()
  TORCH_ARGS=(--torch-compile on --torch-compile-mode default,reduce-overhead)
  TESTS=(-m "not slow" -x -q -p no:cacheprovider)
  TP_CASES=mlp:digits:float32,cnn:mnist:float32,resnet18:cifar:bfloat16
  FUSED_CASES=resnet18:cifar:bfloat16   # 4 steps per call (fusing.fuse_steps): is dispatch the gap?
  PIPE_CASES=mlp:digits,resnet18:cifar
  TTA_PLATFORMS=default,cpu
  CPU_CASES=mlp:digits,cnn:mnist
  CORE_CASES=cnn:mnist
  SEEDS=(--seeds 1,32 --epochs 2)
  # 12 steps of batch 256 on synthetic CIFAR-shape data; steps 4-8 traced (the 1st compiles)
  PROFILE=(-m experiments.cifar10_resnet --dataset synthetic --synthetic-shape 32,32,3
           --synthetic-size 3584 --dtype bfloat16 --batch-size 256 --eval-batch-size 512
           --epochs 1 --warmup-steps 0 --profile-steps 4:9)
  LIM_TESTS=200; LIM_A=120; LIM_B=180
fi

# --- phase A: tests (CPU) alongside GPU-bound benchmarks ---------------------------------
step tests "$LIM_TESTS" "$PY" -m pytest "${TESTS[@]}" "${XDIST[@]}" &
TESTS_PID=$!
step throughput "$LIM_A" "$PY" -m benchmarks.throughput "${S[@]}" --out "$RAW" --tag accel \
  --cases "$TP_CASES" --resnet-batch-size 256 --seconds 1 --repeats 3 "${PEAK_ARGS[@]}"
step fused_steps "$LIM_A" "$PY" -m benchmarks.throughput "${S[@]}" --out "$RAW" --tag accel-fused \
  --cases "$FUSED_CASES" --resnet-batch-size 256 --steps-per-call 4 --seconds 1 --repeats 3 \
  "${PEAK_ARGS[@]}"
step pipeline "$LIM_A" "$PY" -m benchmarks.pipeline "${S[@]}" --out "$RAW" --tag accel \
  --cases "$PIPE_CASES" --batch-size 256 --no-loop --seconds 1
wait "$TESTS_PID"

# --- phase B: quiet machine --------------------------------------------------------------
if [[ "$HAVE_TORCH" == 1 ]]; then
  step torch_resnet "$(remaining "$LIM_B")" "$PY" -m benchmarks.torch_peer "${S[@]}" \
    --out "$RAW" --tag accel --suites resnet --resnet-batch-size 256 --resnet-dtype bfloat16 \
    --seconds 1 --repeats 3 "${TORCH_ARGS[@]}" "${PEAK_ARGS[@]}"
else
  echo "torch_resnet 127 0" >> "$RAW/steps.txt"; echo "=== torch_resnet: PyTorch missing" | tee -a "$LOG"
fi
step tta "$(remaining 120)" "$PY" -m benchmarks.time_to_accuracy "${S[@]}" --out "$RAW" \
  --tag accel --platforms "$TTA_PLATFORMS"
step seeds "$(remaining 90)" "$PY" -m benchmarks.seeds "${SEEDS[@]}" --no-sequential \
  --out "$RAW/seeds-accel.json"
step cpu_throughput "$(remaining 90)" env JAX_PLATFORMS=cpu "$PY" -m benchmarks.throughput "${S[@]}" \
  --out "$RAW" --tag host-cpu --cases "$CPU_CASES" --seconds 1 --repeats 3
# the CNN data-parallel over the cores (--cpu-devices): the CPU's best against the GPU
CORES=1; while (( CORES * 2 <= $(nproc) && CORES * 2 <= 16 )); do CORES=$(( CORES * 2 )); done
step cpu_cores "$(remaining 90)" env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$CORES "$PY" \
  -m benchmarks.throughput "${S[@]}" --out "$RAW" --tag host-cpu-cores --cases "$CORE_CASES" \
  --parallel mesh --seconds 1 --repeats 3
step profile "$(remaining 75)" "$PY" "${PROFILE[@]}" --workdir "$RAW/profile_run" \
  --progress none --compilation-cache ''
cp "$RAW/profile_run/profile/summary.json" "$RAW/profile-accel.json" 2>/dev/null

# --- summary -----------------------------------------------------------------------------
GPU_NAME="$GPU_NAME" PEAK_FLOPS="$PEAK_FLOPS" SMOKE="$SMOKE" ELAPSED="$(elapsed)" \
  "$PY" - "$RAW" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys

raw, out = sys.argv[1], sys.argv[2]
steps = {}
for line in open(os.path.join(raw, "steps.txt")):
    name, rc, secs = line.split()
    steps[name] = {"exit": int(rc), "seconds": int(secs),
                   "status": {"0": "passed", "124": "timed out", "127": "skipped"}.get(rc, "failed")}
docs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(raw, "*.json"))}
mib = lambda b: None if b is None else round(b / 2**20)  # noqa: E731


def mem(r):
    m = r.get("memory") or {}
    return {"device_peak_MiB": mib(m.get("device_peak_bytes")),
            "host_peak_rss_MiB": mib(m.get("host_peak_rss_bytes"))}


figures = {}
for tag in ("accel", "accel-fused", "host-cpu", "host-cpu-cores"):
    d = docs.get(f"throughput-{tag}")
    for r in (d or {}).get("results", []):
        k, n = r.get("steps_per_call") or 1, r.get("num_devices") or 1
        key = (f"throughput/{d['machine']['platform']}/{r['model']}-{r['data']}-{r['dtype']}"
               f"-b{r['batch_size']}" + (f"-k{k}" if k > 1 else "") + (f"-d{n}" if n > 1 else ""))
        figures[key] = {k: r.get(k) for k in ("steps_per_s", "images_per_s", "flops_per_step",
                                              "mfu", "compile_s", "error")} | mem(r)
d = docs.get("pipeline-accel")
for r in (d or {}).get("results", []):
    figures[f"pipeline/{r['model']}-{r['data']}-b{r['batch_size']}"] = {
        k: r.get(k) for k in ("host_steps_per_s", "device_steps_per_s", "synthetic_steps_per_s",
                              "host_vs_synthetic", "device_vs_synthetic", "error")}
d = docs.get("torch_peer-accel")
if d and "resnet" in d:
    res = d["resnet"]
    runs = [("jaxtrain", res["jaxtrain"])] + [
        (f"pytorch/{r.get('torch_compile_mode', 'default')}", r)
        for r in res.get("pytorch_runs", [res["pytorch"]])]
    for side, r in runs:
        figures[f"resnet18_vs_torch/{side}"] = {
            "name": r.get("name", "jaxtrain " + str(r.get("dtype"))),
            **{k: r.get(k) for k in ("images_per_s", "mfu", "batch_size", "error")}, **mem(r)}
    figures["resnet18_vs_torch/ratio_images_per_s"] = res.get("ratio_images_per_s")
d = docs.get("time_to_accuracy-accel")
for r in (d or {}).get("results", []):
    figures[f"time_to_97/{r.get('platform', r['requested_platform'])}/{r['start']}"] = {
        k: r.get(k) for k in ("seconds_from_launch", "seconds_from_training_start",
                              "init_and_first_step_s", "epochs_to_target", "s_per_step_steady",
                              "final_test_accuracy", "error")} | mem(r)
d = docs.get("seeds-accel")
for r in (d or {}).get("rows", []):
    figures[f"seeds/{r['num_seeds']}_in_one_program"] = {
        "seconds": r["multi"]["seconds"], "over_one_seed": r.get("multi_over_one_seed"),
        "peak_memory_MiB": mib(r["multi"]["peak_memory_bytes"]),
        "mean_test_accuracy": r["multi"]["mean_test_accuracy"]}
d = docs.get("profile-accel")
if d:
    figures["profile/train_step"] = {
        **{k: d.get(k) for k in ("program", "calls", "steps", "busy_fraction",
                                 "busy_ms_per_call", "span_ms_per_call", "distinct_ops")},
        "top_ops": [f"{o['name'][:60]}: {o['ms_per_call']:.3g} ms" for o in d["ops"][:5]]}
machine = next((v["machine"] for k, v in sorted(docs.items())
                if k.endswith("accel") and "machine" in v), {})
summary = {
    "benchmark": "gpu_check",
    "device": os.environ["GPU_NAME"] or machine.get("device", "unknown"),
    "machine": machine,
    "peak_flops": float(os.environ["PEAK_FLOPS"]) if os.environ["PEAK_FLOPS"] else None,
    "smoke": os.environ["SMOKE"] == "1",
    "elapsed_s": int(os.environ["ELAPSED"]),
    "steps": steps,
    "figures": figures,
    "results": docs,
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
print(f"\n=== gpu_check on {summary['device']} in {summary['elapsed_s']} s")
for name, s in steps.items():
    print(f"  {name:15s} {s['status']:9s} {s['seconds']:4d} s")
for key, val in figures.items():
    if isinstance(val, dict):
        val = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in val.items() if v is not None)
    print(f"  {key}: {val}")
EOF
tar -czf "$OUT/raw.tar.gz" -C "$RAW" . 2>>"$LOG"
STATUS=0
awk '$2 != 0 { bad = 1 } END { exit bad }' "$RAW/steps.txt" || STATUS=1
rm -rf "$RAW"
echo "=== wrote $OUT/summary.json, $OUT/gpu_check.log, $OUT/raw.tar.gz in $(elapsed)s (exit $STATUS)"
exit "$STATUS"
