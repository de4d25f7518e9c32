#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one NVIDIA GPU (run from anywhere):
#   1. benchmarks/embed.py --gpu: fp32 parity against birder (TF32 off) and bf16 embedding throughput at
#      batch 256 against birder eager and torch.compile, with the fraction of the chip's bf16 peak;
#   2. benchmarks/train_step.py --gpu: the MAE train step at batch 64, fp32 and bf16, against birder eager
#      and torch.compile.
# Needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, torch (CUDA) and birder 0.8.4. When birder is
# missing, every wheel in $WHEELS (default: ./gpu-wheels) is installed without network access: carry birder
# 0.8.4 and those of its dependencies the machine lacks (e.g. torchinfo, polars, webdataset, pycocotools,
# faster_coco_eval), fetched here with `pip download birder==0.8.4 -d gpu-wheels`.
# The package itself need not be installed: the scripts import vitreg_jax from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import birder" 2>/dev/null; then
    "$PY" -m pip install --no-deps --no-index "${WHEELS:-gpu-wheels}"/*.whl
fi
"$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.get_device_name())"
"$PY" benchmarks/embed.py --gpu
PYTHONPATH=. "$PY" benchmarks/train_step.py --gpu --rounds 5
