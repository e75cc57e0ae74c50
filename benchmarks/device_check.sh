#!/usr/bin/env bash
# The GPU check in one command: benchmarks/device_check.py under a time limit, on the JAX
# the machine has (docs/performance.md#gpu-check).
#
# On the GPU machine (its own CUDA build of JAX installed; no package index needed):
#   bash benchmarks/device_check.sh [--wheels DIR] [--timeout SECONDS] [-- device_check.py flags]
#     --wheels DIR     first install requirements.txt without jax and jaxlib from the wheels
#                      in DIR (pip --no-index), leaving the machine's jax alone
#     --timeout S      limit of the check itself (default 470 s: under 8 minutes)
#   Flags after `--` go to device_check.py (e.g. -- --sizes=medium --reps=10).
#
# Where a package index is reachable, to prepare DIR for the GPU machine's Python:
#   bash benchmarks/device_check.sh --download_wheels DIR [--python_version 3.12]
#   Wheels of requirements.txt without jax and jaxlib for CPython 3.12 (default) on x86-64
#   Linux (glibc >= 2.28); a dependency published as source only is built into a wheel
#   here (pure Python, so it installs on any Python 3).
#
# The interpreter is $PYTHON (default python3). XLA flags: none are set. The check runs one
# process on one GPU (or data parallel over the GPUs it finds), where XLA's defaults are
# what a user gets, and cuDNN's fused attention is a custom call that jax emits without any
# flag. XLA_FLAGS from the caller's environment pass through, and the check prints them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS=""
DOWNLOAD=""
PYTHON_VERSION="3.12"
TIMEOUT=470
JSON="$REPO/benchmarks/results/device_check.json"

fail() {
  echo "error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --download_wheels) DOWNLOAD="${2:?--download_wheels needs a directory}"; shift 2 ;;
    --python_version) PYTHON_VERSION="${2:?--python_version needs a version, e.g. 3.12}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    --) shift; break ;;
    *) fail "unknown argument '$1'; see the comment at the top of $0." ;;
  esac
done

for arg in "$@"; do  # where device_check.py will write, for the last line
  case "$arg" in --json=*) JSON="${arg#--json=}" ;; esac
done

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
# requirements.txt without its jax and jaxlib lines: the one list of pins, minus JAX.
req="$SCRATCH/requirements-without-jax.txt"
grep -vE '^(jax|jaxlib)([^a-zA-Z0-9_.-]|$)' "$REPO/requirements.txt" >"$req"

if [ -n "$DOWNLOAD" ]; then
  mkdir -p "$DOWNLOAD"
  # 1. Which dependencies are published as source only: resolve for this Python, and build
  #    the source archives among the files into wheels in DOWNLOAD.
  probe="$SCRATCH/probe"
  "$PYTHON" -m pip download --quiet -r "$req" -d "$probe"
  for sdist in "$probe"/*.tar.gz "$probe"/*.zip; do
    [ -e "$sdist" ] || continue
    "$PYTHON" -m pip wheel --quiet --no-deps "$sdist" -w "$DOWNLOAD"
  done
  # 2. Binary wheels for the target Python; the wheels of step 1 are found in DOWNLOAD.
  # pip takes each platform tag literally, so every manylinux level up to glibc 2.28 is named.
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux2010 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  "$PYTHON" -m pip download --quiet -r "$req" --only-binary=:all: \
    --python-version "$PYTHON_VERSION" "${platforms[@]}" --find-links "$DOWNLOAD" -d "$DOWNLOAD"
  # flax and optax depend on jax: pip fetched it, but the GPU machine keeps its own.
  rm -f "$DOWNLOAD"/jax-[0-9]*.whl "$DOWNLOAD"/jaxlib-[0-9]*.whl
  echo "$(ls "$DOWNLOAD" | wc -l) wheels for Python $PYTHON_VERSION in $DOWNLOAD" \
    "($(du -sh "$DOWNLOAD" | cut -f1)); on the GPU machine:" \
    "bash benchmarks/device_check.sh --wheels $DOWNLOAD"
  exit 0
fi

jax_version() {
  "$PYTHON" -c 'import jax; print(jax.__version__)' 2>/dev/null
}

before="$(jax_version)" || fail "$PYTHON cannot import jax; this check runs on the machine's" \
  "own CUDA build of JAX (e.g. pip install 'jax[cuda13]'); set PYTHON to the interpreter that has it."

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || fail "--wheels $WHEELS is not a directory."
  echo "installing requirements.txt without jax and jaxlib from $WHEELS (jax $before stays)"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$req"
  after="$(jax_version)" || fail "jax no longer imports after installing the wheels of $WHEELS."
  [ "$before" = "$after" ] || fail "installing the wheels changed jax from $before to $after."
fi

cd "$REPO"
status=0
timeout --signal=INT --kill-after=30 "$TIMEOUT" \
  "$PYTHON" benchmarks/device_check.py --json="$JSON" "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "the check ran past --timeout $TIMEOUT s and was stopped"
fi
if [ -f "$JSON" ]; then
  echo "results: $JSON"
fi
exit "$status"
