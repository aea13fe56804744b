#!/bin/bash
# One prepared accelerator session: both GPU benchmarks and a device-decode check, logs under $OUT.
#
#   bash benchmarks/gpu_run.sh          # on the GPU machine, from the repository root
#
# Packages the machine lacks (open_clip_torch, ftfy, wcwidth, simplejpeg) may be carried as wheels in .whl/; they are
# installed into /tmp/site first. Each step has its own time limit, so one hang cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/guie-gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -c "import open_clip, simplejpeg; print('open_clip', open_clip.__version__, 'simplejpeg', simplejpeg.__version__)" \
    2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
echo "== embed"
timeout ${EMBED_S:-300} python3 benchmarks/gpu_embed.py --budget ${EMBED_BUDGET_S:-240} ${EMBED_ARGS:-} 2>&1 \
    | grep -v "^W[0-9]" | tee "$OUT/gpu_embed.jsonl"
echo "== train"
[ "${SKIP_TRAIN:-0}" = 1 ] || timeout ${TRAIN_S:-170} python3 benchmarks/gpu_train.py --out "$OUT/gpu_train.jsonl" ${TRAIN_ARGS:-} 2>&1 \
    | grep -v "^W[0-9]" | tail -25
echo "== device decode tests"
timeout ${TEST_S:-60} python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_embed.py tests/test_geometry.py 2>&1 \
    | tail -12 | tee "$OUT/pytest.txt"
