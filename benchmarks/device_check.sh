#!/usr/bin/env bash
# locconf's GPU checks in one command: CUDA correctness, GPU speed and NEON training on the GPU.
#
#   bash benchmarks/device_check.sh                     # stages: tests bench (~5 min on an H200)
#   STAGES=neon bash benchmarks/device_check.sh         # the NEON recipe at full length (a second command)
#   STAGES="tests bench" bash benchmarks/device_check.sh
#   STAGES=compare SEEDS="0" PARALLEL=8 bash benchmarks/device_check.sh
#   STAGES=compare SEEDS="1" VARIANTS="baseline dir" bash benchmarks/device_check.sh
#
# Writes benchmarks/results/device/*.md (and logs/); where $OUT is set (a lent device machine),
# also packs them, with the runs' metrics and evaluation records, into $OUT/device.tar.gz every
# 30 s and at the end, so that what a stage did comes back even if it runs out of time.
#
# Sizing (measured on an H200, benchmarks/results/device/probe.md): one NEON training process runs
# ~24 iterations/s alone, 16 sharing the GPU ~59/s together. Stages tests + bench take ~5 min; the
# recipe at 3000 iterations ~3-4 min alone; `compare` (8 trained detectors x 3 seeds x 1500
# iterations) ~10 min of training at 59/s: more than one 8-minute command, so give it SEEDS="0"
# (or fewer VARIANTS) per call.
#
# Stages (each needs a CUDA device; the script stops at once without one):
#   tests    the CUDA tests (pytest -m cuda): boxes, post-processing, PrRoIPool, refinement and
#            every detector head on the GPU, against the CPU                -> cuda_tests.md
#   bench    post-processing at 1k/5k/20k/100k boxes against torchvision's CUDA batched_nms and
#            against locconf's CPU path (gpu.py postprocess); PrRoIPool fwd+bwd against roi_align
#            (pooling.py); inference with and without quality heads (inference.py); one training
#            iteration of every detector and of torchvision's Faster R-CNN (gpu.py train-step)
#   probe    training throughput with PARALLEL processes sharing the GPU (sizes the next stages)
#   neon     the pretrained NEON recipe at full length (recipe.py lite0_3000) and the two recipe
#            variants never finished on the CPU (600 px, GIoU loss), in parallel -> recipe_pretrained.md
#   compare  benchmarks/accuracy.py --setting neon for every detector x SEEDS, PARALLEL trainings at
#            a time, then one table                                  -> accuracy_neon/table.md
#
# Install: with a folder .whl/ of wheels (a machine without a package index), those are installed
# into /tmp/locconf-site and src/ is put on PYTHONPATH; otherwise `pip install -e ".[dev]"` unless
# locconf already imports. Data: data/neon is used when present, else fetched (`locconf data`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RES=${RES:-benchmarks/results/device}
STAGES=${STAGES:-"tests bench"}
SEEDS=${SEEDS:-"0 1 2"}
PARALLEL=${PARALLEL:-8}
ITERATIONS=${ITERATIONS:-}           # compare: override the setting's 1500 iterations
PY=${PYTHON:-python3}
LOG=$RES/logs
RUNS=${RUNS:-runs/device}
mkdir -p "$LOG" "$RUNS"
export PYTHONUNBUFFERED=1

pack() {  # results, logs and the runs' small records back to the caller of a lent machine
    if [ -n "${OUT:-}" ]; then
        find "$RES" "$RUNS" -type f \( -path "$RES/*" -o -name "*.json" -o -name "*.jsonl" -o -name "*.md" \) \
            -size -4M -print0 2>/dev/null | tar -czf "$OUT/device.tar.gz.part" --null -T - 2>/dev/null
        mv -f "$OUT/device.tar.gz.part" "$OUT/device.tar.gz"
    fi
}
if [ -n "${OUT:-}" ]; then  # also every 30 s: a command stopped at its time limit still returns its progress
    ( while sleep 30; do pack; done ) &
    PACKER=$!
    trap 'kill $PACKER 2>/dev/null; pack' EXIT
fi
stamp() { echo "[device_check $(date +%H:%M:%S)] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/locconf-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=$ROOT/src:/tmp/locconf-site${PYTHONPATH:+:$PYTHONPATH}
elif ! $PY -c "import locconf" 2>/dev/null; then
    $PY -m pip install -q -e ".[dev]" || exit 1
fi
$PY - <<'EOF' || exit 1
import sys, torch, torchvision
if not torch.cuda.is_available():
    sys.exit("device_check: no CUDA device visible to torch; nothing to check")
import locconf, timm, numba
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"numba {numba.__version__}, {torch.cuda.get_device_name()}, python {sys.version.split()[0]}")
EOF
if [ ! -f data/neon/train.json ]; then
    $PY -c "from locconf.cli import main; main(['data', 'neon-trees', '--out', 'data/neon'])" || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$LOG/gpu.txt" 2>&1
status=0

for stage in $STAGES; do
    stamp "stage $stage"
    t0=$SECONDS
    case $stage in
    tests)
        $PY -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$LOG/cuda_tests.log"
        rc=${PIPESTATUS[0]}
        { echo "# CUDA tests"; echo
          echo "\`python -m pytest -q -m cuda tests\` on $(cat "$LOG/gpu.txt"): exit status $rc."; echo
          echo '```'; grep -E "passed|failed|error" "$LOG/cuda_tests.log" | tail -n 20; echo '```'; } > "$RES/cuda_tests.md"
        [ "$rc" = 0 ] || status=1
        ;;
    bench)
        timeout 150 $PY benchmarks/gpu.py postprocess --repeats 7 --out "$RES/postprocess.md" > "$LOG/postprocess.log" 2>&1 || status=1
        pack
        timeout 60 $PY benchmarks/pooling.py --device cuda --out "$RES/pooling.md" > "$LOG/pooling.log" 2>&1 || status=1
        timeout 120 $PY benchmarks/inference.py --device cuda --candidates 100 1000 --repeats 5 --out "$RES/inference.md" \
            > "$LOG/inference.log" 2>&1 || status=1
        timeout 150 $PY benchmarks/gpu.py train-step --iters 15 --warmup 3 --out "$RES/train_step.md" > "$LOG/train_step.log" 2>&1 || status=1
        ;;
    probe)
        for i in $(seq "$PARALLEL"); do
            OMP_NUM_THREADS=1 $PY benchmarks/gpu.py train-step --variants baseline --iters 30 --warmup 5 \
                --out "$LOG/probe_$i.md" > "$LOG/probe_$i.log" 2>&1 &
        done
        wait
        { echo "# $PARALLEL training processes sharing the GPU (baseline, fp32 and AMP ms/iter each)"; echo
          grep -h "^| baseline" "$LOG"/probe_*.md; } > "$RES/probe.md"
        ;;
    neon)
        for v in lite0_3000 lite0_600px lite0_giou; do
            OMP_NUM_THREADS=1 $PY benchmarks/recipe.py "$v" --runs "$RUNS/recipe" --tables "$RES" \
                > "$LOG/recipe_$v.log" 2>&1 &
        done
        wait || status=1
        OMP_NUM_THREADS=1 $PY benchmarks/recipe.py --table-only --runs "$RUNS/recipe" --tables "$RES" \
            > "$LOG/recipe_table.log" 2>&1 || status=1
        ;;
    compare)
        variants=${VARIANTS:-$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import accuracy as a
print(' '.join(n for n, v in a.VARIANTS.items() if not v.reuse))")}
        iters=${ITERATIONS:+--iterations $ITERATIONS}
        jobs=()
        for s in $SEEDS; do for v in $variants; do jobs+=("$v:$s"); done; done
        running=0
        for job in "${jobs[@]}"; do
            v=${job%:*}; s=${job#*:}
            OMP_NUM_THREADS=1 $PY benchmarks/accuracy.py --setting neon --variants "$v" --seeds "$s" $iters \
                --runs "$RUNS/accuracy_neon" --out "$RUNS/accuracy_neon_parts/${v}_$s" --threads 1 \
                > "$LOG/accuracy_${v}_$s.log" 2>&1 &
            running=$((running + 1))
            if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
        done
        wait
        # every run is trained now: this evaluates what is left (iou_net_refine) and writes the table
        final=$variants
        case " $variants " in *" iou_net "*) final="$variants iou_net_refine" ;; esac
        OMP_NUM_THREADS=4 $PY benchmarks/accuracy.py --setting neon --seeds $SEEDS $iters --variants $final \
            --runs "$RUNS/accuracy_neon" --out "$RES/accuracy_neon" > "$LOG/accuracy_table.log" 2>&1 || status=1
        ;;
    *)
        echo "unknown stage $stage (tests bench probe neon compare)"; status=1 ;;
    esac
    stamp "stage $stage done in $((SECONDS - t0)) s"
    pack
done
exit $status
