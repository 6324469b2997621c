#!/usr/bin/env bash
# locconf's GPU checks in one command: CUDA correctness, GPU speed and NEON training on the GPU.
#
#   bash benchmarks/device_check.sh                     # stages: tests bench (~5 min on an H200)
#   STAGES=neon bash benchmarks/device_check.sh         # the NEON recipe at full length (a second command)
#   STAGES="tests bench" bash benchmarks/device_check.sh
#   STAGES=compare SEEDS="0" PARALLEL=8 bash benchmarks/device_check.sh
#   STAGES=compare SEEDS="1" VARIANTS="baseline dir" bash benchmarks/device_check.sh
#   MPS=1 STAGES=queue JOBS="acc:baseline:1 recipe:lite0_giou" bash benchmarks/device_check.sh
#
# Writes benchmarks/results/device/*.md (and logs/); where $OUT is set (a lent device machine),
# also packs them, with the runs' metrics and evaluation records, into $OUT/device.tar.gz every
# 30 s and at the end, so that what a stage did comes back even if it runs out of time.
#
# Sizing (measured on an H200): one NEON training process runs ~24 iterations/s alone; 16 sharing the
# GPU by time-slicing ~59/s together (benchmarks/results/device/probe.md); 16 under MPS (MPS=1)
# ~170/s together (each 1500-iteration training 2.1-2.7 min: 24 comparison trainings and 3 recipe
# runs, 16 at a time, finished in 347 s; benchmarks/results/device/queue.md). Stages tests + bench
# take ~5 min.
# Without MPS, `compare` (11 trained detectors x 3 seeds x 1500 iterations) is more than one
# 10-minute device command: give it SEEDS="0" (or fewer VARIANTS) per call, or use MPS=1.
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
#   queue    one pool of PARALLEL jobs, in the order of JOBS: `acc:<variant>:<seed>` (a comparison
#            run, as compare's; iou_net also evaluates iou_net_refine) and `recipe:<variant>`
#            (recipe.py); no new job starts after DEADLINE_S seconds of the stage. Then the recipe
#            table (recipe_pretrained.md). Each comparison job writes its own table
#            (runs/device/accuracy_neon_parts/); every run's small records come back (pack), and
#            accuracy.py rebuilds the whole comparison from them without the weights (`records only`).
#
# Options: AMP=off (default for compare/queue/neon) trains in fp32, as on the CPU (measured no slower
# than mixed precision at batch 2: train_step.md); AMP=on is train()'s CUDA default. MPS=1 starts
# NVIDIA's Multi-Process Service so that the parallel trainings' kernels share the GPU instead of
# taking turns; if it does not start or a CUDA probe fails under it, it is stopped and the run goes
# on without it, with PARALLEL_NO_MPS jobs at a time (logs/mps.txt says which). ALLOW_CPU=1 runs the
# script's plumbing without a GPU (a dry run: use ITERATIONS to keep it short).
#
# Install: with a folder .whl/ (or $WHEELS) of wheels (a machine without a package index), those are installed
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
AMP=${AMP:-off}
MPS=${MPS:-0}
PARALLEL_NO_MPS=${PARALLEL_NO_MPS:-$PARALLEL}
DEADLINE_S=${DEADLINE_S:-100000}
LOG=$RES/logs
RUNS=${RUNS:-runs/device}
mkdir -p "$LOG" "$RUNS"
export PYTHONUNBUFFERED=1

pack() {  # results, logs and the runs' small records back to the caller of a lent machine
    if [ -n "${OUT:-}" ]; then
        local part="$OUT/device.tar.gz.part$BASHPID"
        find "$RES" "$RUNS" -type f \( -path "$RES/*" -o -name "*.json" -o -name "*.jsonl" -o -name "*.md" \
            -o -name "*.yaml" -o -name "confidence.png" \) -size -4M -print0 2>/dev/null | tar -czf "$part" --null -T - 2>/dev/null
        mv -f "$part" "$OUT/device.tar.gz"
    fi
}
if [ -n "${OUT:-}" ]; then  # also every 30 s: a command stopped at its time limit still returns its progress
    ( while sleep 30; do pack; done ) &
    PACKER=$!
    trap 'kill $PACKER 2>/dev/null; pack' EXIT
fi
stamp() { echo "[device_check $(date +%H:%M:%S)] $*"; }
# The stages' jobs, by pid: a bare `wait` would also wait for the packer, which never ends.
pids=()
running_jobs() { local n=0 p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
wait_below() { while [ "$(running_jobs)" -ge "$1" ]; do sleep 2; done; }  # until fewer than $1 run
wait_jobs() { local p rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; pids=(); return $rc; }

WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/locconf-site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$ROOT/src:/tmp/locconf-site${PYTHONPATH:+:$PYTHONPATH}
elif ! $PY -c "import locconf" 2>/dev/null; then
    $PY -m pip install -q -e ".[dev]" || exit 1
fi
ALLOW_CPU=${ALLOW_CPU:-0} $PY - <<'EOF' || exit 1
import os, sys, torch, torchvision
if not torch.cuda.is_available() and os.environ["ALLOW_CPU"] != "1":
    sys.exit("device_check: no CUDA device visible to torch; nothing to check")
import locconf, timm, numba
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"numba {numba.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
      f"python {sys.version.split()[0]}")
EOF
if [ ! -f data/neon/train.json ]; then
    $PY -c "from locconf.cli import main; main(['data', 'neon-trees', '--out', 'data/neon'])" || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$LOG/gpu.txt" 2>&1
status=0
amp_flag="--amp $AMP"

if [ "$MPS" = 1 ]; then  # NVIDIA MPS: the processes' kernels run side by side instead of time-sliced
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    mps=off
    # a daemon left by an earlier command on the same machine ("already running") is used as it is
    if command -v nvidia-cuda-mps-control >/dev/null && { nvidia-cuda-mps-control -d >> "$LOG/mps.txt" 2>&1 ||
            echo get_server_list | nvidia-cuda-mps-control >> "$LOG/mps.txt" 2>&1; }; then
        if timeout 60 $PY -c "import torch; x = torch.ones(4, device='cuda'); assert float(x.sum()) == 4.0" \
                >> "$LOG/mps.txt" 2>&1; then
            mps=on
        else
            echo quit | nvidia-cuda-mps-control >> "$LOG/mps.txt" 2>&1
            unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        fi
    else
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
    echo "MPS $mps ($(command -v nvidia-cuda-mps-control || echo 'no nvidia-cuda-mps-control'))" >> "$LOG/mps.txt"
    cat /tmp/mps_log/control.log >> "$LOG/mps.txt" 2>/dev/null
    [ "$mps" = on ] || PARALLEL=$PARALLEL_NO_MPS
    stamp "MPS $mps; $PARALLEL jobs at a time"
fi
# compile and cache the post-processing kernels (numba) once, before many processes need them at once
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); import postprocess as b
args = b.detector_like(300, 2)
for fn in b.METHODS.values(): fn(*args)" > "$LOG/numba_warmup.log" 2>&1 &

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
            pids+=($!)
        done
        wait_jobs
        { echo "# $PARALLEL training processes sharing the GPU (baseline, fp32 and AMP ms/iter each)"; echo
          grep -h "^| baseline" "$LOG"/probe_*.md; } > "$RES/probe.md"
        ;;
    neon)
        for v in lite0_3000 lite0_600px lite0_giou; do
            OMP_NUM_THREADS=1 $PY benchmarks/recipe.py "$v" --runs "$RUNS/recipe" --tables "$RES" $amp_flag \
                > "$LOG/recipe_$v.log" 2>&1 &
            pids+=($!)
        done
        wait_jobs || status=1
        OMP_NUM_THREADS=1 $PY benchmarks/recipe.py --table-only --runs "$RUNS/recipe" --tables "$RES" \
            > "$LOG/recipe_table.log" 2>&1 || status=1
        ;;
    compare)
        variants=${VARIANTS:-$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import accuracy as a
print(' '.join(n for n, v in a.VARIANTS.items() if not v.reuse))")}
        iters=${ITERATIONS:+--iterations $ITERATIONS}
        jobs=()
        for s in $SEEDS; do for v in $variants; do jobs+=("$v:$s"); done; done
        for job in "${jobs[@]}"; do
            v=${job%:*}; s=${job#*:}
            OMP_NUM_THREADS=1 $PY benchmarks/accuracy.py --setting neon --variants "$v" --seeds "$s" $iters \
                --runs "$RUNS/accuracy_neon" --out "$RUNS/accuracy_neon_parts/${v}_$s" --threads 1 $amp_flag \
                > "$LOG/accuracy_${v}_$s.log" 2>&1 &
            pids+=($!)
            wait_below "$PARALLEL"
        done
        wait_jobs || status=1
        # every run is trained now: this evaluates what is left (iou_net_refine) and writes the table
        final=$variants
        case " $variants " in *" iou_net "*) final="$variants iou_net_refine" ;; esac
        OMP_NUM_THREADS=4 $PY benchmarks/accuracy.py --setting neon --seeds $SEEDS $iters --variants $final \
            --runs "$RUNS/accuracy_neon" --out "$RES/accuracy_neon" $amp_flag > "$LOG/accuracy_table.log" 2>&1 || status=1
        ;;
    queue)
        iters=${ITERATIONS:+--iterations $ITERATIONS}
        recipes=""
        for job in ${JOBS:?queue needs JOBS}; do
            if [ "$((SECONDS - t0))" -ge "$DEADLINE_S" ]; then stamp "deadline: $job and later not started"; break; fi
            case $job in
            acc:*:*)
                v=${job#acc:}; s=${v#*:}; v=${v%:*}
                names=$v; [ "$v" = iou_net ] && names="iou_net iou_net_refine"
                OMP_NUM_THREADS=1 $PY benchmarks/accuracy.py --setting neon --variants $names --seeds "$s" $iters \
                    --runs "$RUNS/accuracy_neon" --out "$RUNS/accuracy_neon_parts/${v}_$s" --threads 1 $amp_flag \
                    > "$LOG/accuracy_${v}_$s.log" 2>&1 &
                pids+=($!)
                ;;
            recipe:*)
                v=${job#recipe:}; recipes="$recipes $v"
                OMP_NUM_THREADS=1 $PY benchmarks/recipe.py "$v" --runs "$RUNS/recipe" --tables "$RES" $amp_flag \
                    > "$LOG/recipe_$v.log" 2>&1 &
                pids+=($!)
                ;;
            *) echo "unknown job $job (acc:<variant>:<seed> or recipe:<variant>)"; status=1; continue ;;
            esac
            stamp "started $job"
            wait_below "$PARALLEL"
        done
        wait_jobs || status=1
        # no table of the comparison here: a run killed at the time limit would be retrained by it. Each
        # job wrote its own (accuracy_neon_parts/); the records come back and the table is built from them.
        if [ -n "$recipes" ]; then
            OMP_NUM_THREADS=1 $PY benchmarks/recipe.py --table-only --runs "$RUNS/recipe" --tables "$RES" \
                > "$LOG/recipe_table.log" 2>&1 || status=1
        fi
        ;;
    *)
        echo "unknown stage $stage (tests bench probe neon compare queue)"; status=1 ;;
    esac
    stamp "stage $stage done in $((SECONDS - t0)) s"
    pack
done
exit $status
