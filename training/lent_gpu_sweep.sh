#!/usr/bin/env bash
# One call on a lent GPU machine (no network, no pydantic, at most 64 MiB carried): install the carried
# wheels, unpack the train + validation cells, run a sweep (training/sweep.py) and collect each run's slim
# float16 checkpoint and the sweep's summary under DEST/sweep, and every run's metrics and logs in
# DEST/runs.tar.gz (at most 8 files come back from such a machine: 3 runs give 5). README "Training,
# evaluating, exporting" says how to prepare what it reads:
#   .whl/                       pydantic and its needs, CPython 3.12 wheels
#   .gpu/elpv-trainval.tar.gz   python -m datasets.pack write (the test cells never travel)
#   .gpu/lite0-imagenet.pt.gz   python -m training.slim imagenet efficientnet_lite0 ... --half
# Give the call a timeout of at least the sweep's deadline_s + 60 s (wheels, unpacking, collecting):
# what is collected is written after the deadline. The exit status is the sweep's: 0 when every run
# finished or was stopped at the deadline with a best checkpoint so far (collected; the summary's outcome
# says which), 1 when a run crashed or was stopped before its first checkpoint (the sweep names it in an
# `error:` line), 2 for a bad sweep file; 1 also when the runs' logs could not be archived. Whatever the
# sweep's status, what it collected and the runs' logs come back.
#
# usage: bash training/lent_gpu_sweep.sh SWEEP_FILE DEST [PYTHON]
# (PVQC_NO_WHEELS=1 skips the wheels: a dry run on a machine that has pydantic)
set -u
SWEEP=${1:?usage: bash training/lent_gpu_sweep.sh SWEEP_FILE DEST [PYTHON]}
DEST=${2:?usage: bash training/lent_gpu_sweep.sh SWEEP_FILE DEST [PYTHON]}
PY=${3:-python3}
t0=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -z "${PVQC_NO_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, timm, pydantic; print('torch', torch.__version__, 'timm', timm.__version__, 'pydantic', pydantic.__version__, 'cuda', torch.cuda.is_available())" || exit 1
rm -rf /tmp/elpv /tmp/runs
$PY -m datasets.pack read .gpu/elpv-trainval.tar.gz /tmp/elpv || exit 1
gunzip -c .gpu/lite0-imagenet.pt.gz >/tmp/lite0-imagenet.pt || exit 1
echo "ready after $(($(date +%s) - t0)) s"
PVQC_ELPV_ROOT=/tmp/elpv PVQC_IMAGENET_WEIGHTS=/tmp/lite0-imagenet.pt \
    $PY -m training.sweep "$SWEEP" --work /tmp/runs --collect "$DEST/sweep" --half
rc=$?
echo "sweep rc $rc after $(($(date +%s) - t0)) s"
if [ -d /tmp/runs ]; then
    if ! tar -czf "$DEST/runs.tar.gz" -C /tmp/runs --exclude='*.pt' .; then
        echo "could not archive the runs' logs"
        [ "$rc" -eq 0 ] && rc=1
    fi
else
    echo "no runs to archive"
fi
for f in /tmp/runs/*/metrics.csv; do
    echo "== $f"
    tail -n 4 "$f"
done
exit $rc
