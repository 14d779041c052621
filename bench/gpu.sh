#!/usr/bin/env bash
# The README's GPU figures in one run, on a node with a CUDA GPU (~5 min on one H200):
#   1. extraction tiles/s, full pipeline vs decode-only vs encoder-only (bench/extract.py),
#      for resnet18_simclr and uni, on a 40k x 30k mosaic of real tissue;
#   2. GPU vs CPU features of the same tiles (the on-device transform + autocast change nothing
#      a classifier would see: cosine similarity per tile);
#   3. the M2OTCA training step and first epoch (bench/train_step.py --device cuda);
#   4. SimCLR pretraining images/s vs the model's own forward+backward (bench/pretrain.py).
# Each step logs to OUTDIR/<step>.txt and a failing step does not stop the others.
#
#   bash bench/gpu.sh [OUTDIR]     env: PYTHON, DEVICE (cuda), WORKERS (nproc - 2), SIZE, NTILES,
#                                  ENCODERS ("resnet18_simclr uni"), EPOCH_SLIDES, PRETRAIN_BATCH, CACHE
set -u
out=${1:-bench-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
size=${SIZE:-40000x30000}
ntiles=${NTILES:-4096}
encoders=${ENCODERS:-resnet18_simclr uni}
epoch_slides=${EPOCH_SLIDES:-270}
pretrain_batch=${PRETRAIN_BATCH:-256}
cache=${CACHE:-/tmp/m2otca-bench}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, tee to OUTDIR/NAME.txt, report its time and exit code
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( SECONDS - t0 )) s"
    [ "$rc" = 0 ] || status=1
}

step machine bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true;
  echo cpus \$(nproc); $py -c 'import sys, torch, timm, zarr, openslide
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__,
      \"zarr\", zarr.__version__, \"openslide\", openslide.__library_version__)'"
for enc in $encoders; do
    step "extract_$enc" "$py" bench/extract.py --device "$dev" --encoder "$enc" --size "$size" \
        --n-tiles "$ntiles" --batch-size 256 --workers "$workers" --repeats 3 --cache "$cache"
done
step gpu_vs_cpu "$py" - "$cache/mosaic-$size.tiles.zarr" "$cache/mosaic-$size.tiff" "$dev" $encoders <<'EOF'
"""Features of the same 256 tiles on the GPU (autocast) and the CPU (float32): cosine per tile."""
import sys
import torch
sys.path.insert(0, ".")
from pipeline.features.extract import Encoder, TileDataset
from pipeline.store import read_tile_store
store, slide, dev, *encoders = sys.argv[1:]
ts = read_tile_store(store)
mag = "20x"
ds = TileDataset(slide, ts.meta.base_mpp, ts.tiles[mag].coords[:256],
                 ts.meta.tiling["magnifications"][mag], ts.meta.tiling["tile_size"])
x = torch.stack([ds[i][0] for i in range(len(ds))])  # (256, S, S, 3) uint8
for name in encoders:
    torch.manual_seed(0)
    gpu = Encoder(name, None, torch.device(dev))
    cpu = Encoder(name, None, torch.device("cpu"))
    cpu.model.load_state_dict(gpu.model.state_dict())
    a, b = gpu(x).double(), cpu(x).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = (a - b).norm(dim=1) / b.norm(dim=1)
    print(f"{name}: precision {gpu.spec.precision}, cosine min {cos.min():.5f} median {cos.median():.5f}, "
          f"relative L2 median {rel.median():.4f} max {rel.max():.4f}")
EOF
step train_step "$py" bench/train_step.py --device "$dev" --reps 20 --epoch-slides "$epoch_slides" --cohort-dir "$cache/cohort" \
    --epoch-repeats 4
# the first epoch's bags read by the prefetch thread instead of the reader process: the A/B the README reports
step train_step_thread "$py" bench/train_step.py --device "$dev" --reps 2 --epoch-slides "$epoch_slides" \
    --cohort-dir "$cache/cohort" --epoch-repeats 4 --loader thread
step pretrain "$py" bench/pretrain.py "$cache/mosaic-$size.tiles.zarr" --device "$dev" \
    --mag 20x,10x,5x --workers "$workers" --steps 30 --batch-size "$pretrain_batch" --crop 224
exit $status
