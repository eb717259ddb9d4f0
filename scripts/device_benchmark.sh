#!/usr/bin/env bash
# The training-throughput / MFU benchmark (scripts/benchmark_training.py) on a lent GPU machine, in ONE call.
#
# 1. Here, on the development machine, from the repository root (the wheels are never committed; .whl/ is
#    ignored through .git/info/exclude, which the fetch script sets up):
#
#        bash scripts/fetch_device_wheels.sh
#
#    which runs (versions from requirements.txt; all four are pure-Python wheels, about 7.8 MiB together;
#    their own requirements, numpy, torch and packaging, are already in the GPU image):
#
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
#            -d .whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 timm==1.0.31
#
# 2. The call, with the device tool:
#
#        run(command="bash scripts/device_benchmark.sh", carry=[".whl"], timeout_s=590)
#
#    In order: the data-pipeline benchmark on the idle machine (at most 2.5 minutes: CPU figures of this
#    machine, and the batch photometric step on the GPU); the CUDA-only tests (at most 1 minute); the training
#    benchmark, which stops starting encoders after BUDGET seconds (default 170; most important encoders
#    first) and is interrupted at BUDGET + 60 s at the latest, still printing its table; then ViT-L once more
#    with the bundle's photometric_on_device (at most 100 s).  The call ends in about 8.5 minutes.  Arguments after the script
#    name go to the main benchmark_training.py run (e.g. `bash scripts/device_benchmark.sh --encoders vit_l16_21k,uni`).
#
# What comes back under $OUT: nvidia-smi.txt, pytest_cuda.log, benchmark_data_pipeline.log,
# benchmark_training.json (full record) and .log (everything printed, tracebacks included), and the same two
# for the photometric_on_device run (benchmark_training_photometric_on_device.*).  The Markdown table is the last thing printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
BUDGET=${BUDGET:-170}
mkdir -p "$OUT"

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run scripts/fetch_device_wheels.sh first and pass carry=[\".whl\"]" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
    --format=csv; nproc; free -g; } > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
python3 -c "import torch, timm, monai, ignite, nibabel, cellgap.bundle, cellgap.targets; \
print('python3', __import__('sys').version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, \
'monai', monai.__version__, 'ignite', ignite.__version__, 'cuda available', torch.cuda.is_available())" || exit 4

# First, while the CPU is idle: the data pipeline on this machine's CPU and the batch photometric step on its
# GPU (about 1.5–2 minutes).
timeout --kill-after=10 150 python3 scripts/benchmark_data_pipeline.py --tiles 24 --repeats 5 --worker-tiles 128 \
    2>&1 | grep -v "packing" | tee "$OUT/benchmark_data_pipeline.log"

# The tests that need a CUDA device (skipped on the CPU machines that run CI).
timeout --kill-after=10 60 python3 -m pytest -q tests/test_metrics_inputs.py tests/test_postprocessing.py tests/test_dataloader.py tests/test_targets.py -k cuda -rs \
    2>&1 | tee "$OUT/pytest_cuda.log"

timeout --signal=INT --kill-after=30 $((BUDGET + 60)) \
    python3 scripts/benchmark_training.py --device cuda --time-budget "$BUDGET" --out "$OUT/benchmark_training.json" "$@" \
    2>&1 | tee "$OUT/benchmark_training.log"
rc=${PIPESTATUS[0]}
echo "benchmark_training.py exit status $rc"

# ViT-L with the photometric steps on the GPU: what the loader workers are spared, and what the step pays.
timeout --signal=INT --kill-after=20 100 \
    python3 scripts/benchmark_training.py --device cuda --encoders vit_l16_21k --photometric-on-device \
    --out "$OUT/benchmark_training_photometric_on_device.json" \
    2>&1 | tee "$OUT/benchmark_training_photometric_on_device.log"
echo "benchmark_training.py --photometric-on-device exit status ${PIPESTATUS[0]}"
exit "$rc"
