#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU, nvcc and PyTorch (no network needed):
#   1. build mamba-ssm from its sdist for this GPU's architecture only (mamba-ssm's setup.py builds for ~9
#      architectures and ignores TORCH_CUDA_ARCH_LIST; the copy built here is patched to the one GPU), timed;
#   2. meanwhile, benchmarks/gpu_pipeline.py: extract, train, score on the GPU (our scan) against the CPU;
#   3. the kernel-vs-our-scan test (tests/models/test_mamba.py, marked gpu) and the scan tests with CUDA;
#   4. benchmarks/gpu_context.py: both paths at 16k-64k tokens.
# Usage: bash benchmarks/gpu_check.sh SDIST OUTDIR   (SDIST: mamba_ssm-*.tar.gz, e.g. from `pip download
# --no-binary :all: --no-deps mamba-ssm`; xtpath importable, e.g. PYTHONPATH=$PWD)
# On a machine without network whose Python lacks some of xtpath's dependencies (the lent H100 image lacked
# openslide-python, openslide-bin, tiffslide, zarr, donfig, google-crc32c, numcodecs, imagecodecs, shapely):
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...` them
# into a folder, install there with `pip install --no-index --no-deps --target /tmp/site *.whl` and put
# /tmp/site first on PYTHONPATH. Environment knobs: BUILD_TIMEOUT, PIPELINE_TIMEOUT, CONTEXT_TIMEOUT (seconds),
# SKIP_TESTS=1, REPEATS, CONTEXT_ARGS (extra gpu_context.py options), MAX_JOBS.
set -u
sdist=$1; out=$2; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L; nvcc --version | tail -1
arch=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
echo "torch $(python3 -c 'import torch; print(torch.__version__)'), building for sm_$arch"
src=$(mktemp -d); tar xzf "$sdist" -C "$src"; cd "$src"/mamba_ssm-* || exit 1
python3 - "$arch" <<'PY'
import re, sys
arch = sys.argv[1]
s = open("setup.py").read()
s, n = re.subn(r"\n    # HACK: The compiler flag", f'\n    cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n    # HACK: The compiler flag', s, count=1)
assert n == 1, "mamba-ssm's setup.py changed: patch the architecture list by hand"
open("setup.py", "w").write(s)
PY
t0=$(date +%s)
( MAMBA_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${arch:0:1}.${arch:1}" MAX_JOBS=${MAX_JOBS:-16} \
  timeout ${BUILD_TIMEOUT:-400} python3 -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir \
  --target /tmp/mamba_site . > "$out/build.log" 2>&1; echo "build exit $? after $(( $(date +%s) - t0 )) s" > "$out/build.txt" ) &
build=$!
cd - > /dev/null
timeout ${PIPELINE_TIMEOUT:-300} python3 benchmarks/gpu_pipeline.py --work /tmp/gpu_pipeline --out "$out/gpu_pipeline.json" \
  > "$out/pipeline.log" 2>&1; echo "gpu_pipeline exit $?"; tail -4 "$out/pipeline.log"
wait $build; cat "$out/build.txt"; tail -3 "$out/build.log"
export PYTHONPATH=/tmp/mamba_site:${PYTHONPATH:-}
python3 -c "import mamba_ssm, selective_scan_cuda; print('mamba_ssm', mamba_ssm.__version__)" || exit 1
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/models/test_mamba.py tests/models/test_scan.py -k "mamba or impl_errors" 2>&1 | tail -5
timeout ${CONTEXT_TIMEOUT:-150} python3 benchmarks/gpu_context.py --repeats ${REPEATS:-2} ${CONTEXT_ARGS:-} --out "$out/gpu_context.json" \
  2>&1 | tee "$out/context.log" | tail -6
