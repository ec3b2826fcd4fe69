#!/usr/bin/env bash
# Issue 24's device check, prepared for a lent GPU (device tool `run`, ≤ 10 min a call), from the
# repository root:  bash scripts/gpu_speed_check.sh steps   then   bash scripts/gpu_speed_check.sh study
#   steps: the per-step figures of bench.py (kernels per step, device busy share, images/s, MFU)
#          at batch 64 eager / compiled / CUDA graphs and at batch 32 with CUDA graphs;
#   study: the down-scaled real study (one run per kind of step, 1 % of its work) with 1, 2 and 4
#          runs per GPU, projected to the whole `full` study, per backbone.
# Results go to $OUT (the device tool brings back at most 8 files): one JSON per bench run and
# the log. The device image's python3 holds torch; transformers ≥ 5 and peft can be carried as
# wheels in .whl/ (see /work/.library/device/README.md), installed here when present.
set -uo pipefail
part=${1:?usage: gpu_speed_check.sh steps|study}
OUT=${OUT:-outputs/bench/gpu}
mkdir -p "$OUT" /tmp/bench
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # shared by every run below, as in a study
nvidia-smi -L | tee -a "$OUT/log.txt"
common=(--device cuda --size full --steps 30 --warmup 5 --evals 3 --prep-images 16 --prep-passes 1)

bench() {  # name, time limit (s), bench.py arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name: bench.py $*" | tee -a "$OUT/log.txt"
    timeout "$limit" python3 bench.py "$@" --out "/tmp/bench/$name" 2>&1 | tail -40 >>"$OUT/log.txt"
    cp "/tmp/bench/$name/latest.json" "$OUT/$name.json" 2>/dev/null || echo "$name: no result" >>"$OUT/log.txt"
}

case $part in
steps)
    bench b64-eager 100 "${common[@]}" --batch-size 64 --compile off
    bench b64-compiled 180 "${common[@]}" --batch-size 64 --compile default
    bench b64-cudagraphs 180 "${common[@]}" --batch-size 64 --compile reduce-overhead
    bench b32-cudagraphs 120 "${common[@]}" --batch-size 32 --compile reduce-overhead
    ;;
study)
    bench study 540 --device cuda --size full --steps 2 --warmup 1 --evals 1 --prep-images 16 \
        --prep-passes 1 --study --study-sample --study-scale 0.01 --runs-per-gpu 1 2 4
    ;;
*)
    echo "unknown part $part (steps or study)" >&2
    exit 2
    ;;
esac
