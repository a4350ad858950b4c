#!/usr/bin/env bash
# A gpu-preset run longer than one 10-minute device command: `start` launches
# device_generator.sh for MR and then CT in a detached session (it outlives the command while
# the machine stays warm), and each `wait` call watches it for up to SECONDS, then returns the
# logs and, once everything has finished, all outputs as one archive under $OUT. Every call
# must carry .gpudata and .whl again: a call that does not removes them from the tree there.
# Usage there: bash bench/device_generator_long.sh start MR_BUDGET CT_BUDGET AE_SHARE
#              bash bench/device_generator_long.sh wait SECONDS
set -euo pipefail
work=/tmp/long
case $1 in
start)
    rm -rf "$work" && mkdir -p "$work/out"
    setsid nohup bash -c "OUT=$work/out bash bench/device_generator.sh mr $2 $4 >$work/mr.log 2>&1; \
        OUT=$work/out bash bench/device_generator.sh ct $3 $4 >$work/ct.log 2>&1; touch $work/done" \
        >/dev/null 2>&1 < /dev/null &
    echo "started: mr ${2} s, ct ${3} s, autoencoder share $4"
    ;;
wait)
    end=$(( $(date +%s) + $2 ))
    while [ ! -e "$work/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
    for f in "$work"/mr.log "$work"/ct.log "$work"/out/train-*.err; do
        [ -e "$f" ] && { echo "== $f"; tail -n 25 "$f"; }
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
    if [ -e "$work/done" ]; then
        tar czf "${OUT:-/tmp}/long.tar.gz" -C "$work" out mr.log ct.log
        echo "finished; outputs in long.tar.gz"
    fi
    ;;
esac
