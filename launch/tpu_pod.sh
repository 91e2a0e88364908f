#!/usr/bin/env bash
# Train nbp-jax on a Cloud TPU VM slice (single- or multi-host): one process per TPU VM worker, all started
# together with `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed finds the coordinator from the
# TPU metadata (NBP_DISTRIBUTED=1).
#
#   TPU_NAME=nbp-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 WORKDIR=/mnt/shared/k600_3b \
#     launch/tpu_pod.sh all configs/k600_3b.py --config.optim.lr=2e-4
#
# Steps (run one at a time, or `all` = create + setup + train):
#   create   create the slice if it does not exist (ACCELERATOR; RUNTIME, default the one Google lists for its
#            generation; SPOT=1 for spot capacity)
#   setup    copy this checkout (git archive of HEAD) to every worker and install it (jax[tpu] + requirements.txt)
#            into a virtual environment of PYTHON (default python3.11, installed with apt where missing)
#   train    start training on every worker in the background; logs in ~/nbp-jax/train.log on each worker
#            (MODE=eval, sample, pipeline, ...: that mode instead; every mode but import/export runs on all hosts)
#   logs     follow worker 0's log
#   stop     stop training on every worker (SIGTERM: the trainer saves a checkpoint and exits)
#   delete   delete the slice
#
# WORKDIR must be one directory that every worker sees (a Filestore/NFS mount, or a GCS bucket mounted with
# gcsfuse): orbax writes each checkpoint collectively from all hosts, and a resumed run reads it back from there.
# Rerunning `train` with the same WORKDIR resumes from the latest checkpoint (after a preemption, too).
set -euo pipefail

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 1 ]] || usage
step="$1"
shift

: "${TPU_NAME:?set TPU_NAME (the slice name)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
# The TPU software version Google lists for JAX on each generation (cloud.google.com/tpu/docs/runtimes).
case "$ACCELERATOR" in
  v6e*) default_runtime=v2-alpha-tpuv6e ;;
  v5p*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod* | v5e*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME="${RUNTIME:-$default_runtime}"
# The project needs Python >= 3.11; these images are Ubuntu 22.04, whose python3 is 3.10 (setup installs 3.11).
PYTHON="${PYTHON:-python3.11}"
REMOTE_DIR="${REMOTE_DIR:-nbp-jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

gc() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"
}

on_all_workers() {
  gc ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  if gc describe "$TPU_NAME" >/dev/null 2>&1; then
    echo "TPU $TPU_NAME already exists in $ZONE."
    return
  fi
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  gc create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
}

setup() {
  local tarball
  tarball="$(mktemp -t nbp-jax-XXXXXX.tar.gz)"
  git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
  gc scp "$tarball" "$TPU_NAME:~/nbp-jax.tar.gz" --worker=all
  rm -f "$tarball"
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/nbp-jax.tar.gz -C ~/$REMOTE_DIR; \
    cd ~/$REMOTE_DIR; \
    command -v $PYTHON >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv; }; \
    $PYTHON -c 'import sys; assert sys.version_info >= (3, 11), \"nbp-jax needs Python >= 3.11, $PYTHON is \" + sys.version'; \
    $PYTHON -m venv .venv; .venv/bin/pip install -q --upgrade pip; \
    .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
    .venv/bin/pip install -q --no-deps -e ."
}

train() {
  [[ $# -ge 1 ]] || { echo "train needs a config file, e.g. configs/k600_3b.py" >&2; exit 2; }
  : "${WORKDIR:?set WORKDIR to a directory shared by all workers (NFS or gcsfuse mount)}"
  local config="$1"
  shift
  local flags=""
  local f
  for f in "$@"; do
    flags+=" $(printf '%q' "$f")"
  done
  on_all_workers "cd ~/$REMOTE_DIR && NBP_DISTRIBUTED=1 nohup .venv/bin/python -m nbp_jax.main \
    --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$WORKDIR") --mode=$(printf '%q' "${MODE:-train}")$flags \
    > train.log 2>&1 < /dev/null &"
  echo "Started on all workers of $TPU_NAME. Follow with: $0 logs"
}

case "$step" in
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  all) create; setup; train "$@" ;;
  logs) gc ssh "$TPU_NAME" --worker=0 --command="tail -f ~/$REMOTE_DIR/train.log" ;;
  stop) on_all_workers "pkill -TERM -f 'nbp_jax.main' || true" ;;
  delete) gc delete "$TPU_NAME" --quiet ;;
  *) usage ;;
esac
