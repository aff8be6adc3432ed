#!/usr/bin/env bash
# Create (once) or reuse the project's virtual environment, then run a task in it.
#   bash launchers/env.sh pretrain [key=value ...]   the demo pretraining job
#   bash launchers/env.sh test [pytest args ...]      the test suite
#   bash launchers/env.sh setup                       only build the environment
# The environment is rebuilt when pyproject.toml is newer than it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${MAESCALE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.maescale-installed"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_venv_module() {
  # Debian/Ubuntu ship `venv` (and ensurepip) in a separate package.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "env.sh: installing python3-venv with apt-get" >&2
    as_root apt-get update -qq
    as_root apt-get install -y -qq python3-venv
  fi
}

ensure_ffcv_build_deps() {
  # FFCV compiles at install against libjpeg-turbo and OpenCV 4 (found through pkg-config).
  if pkg-config --exists opencv4 libturbojpeg 2>/dev/null && command -v cc >/dev/null; then
    return
  fi
  if ! command -v apt-get >/dev/null; then
    echo "env.sh: install pkg-config, libjpeg-turbo, OpenCV 4 (with opencv4.pc) and a C compiler for FFCV" >&2
    return 1
  fi
  echo "env.sh: installing FFCV's build dependencies with apt-get" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    pkg-config libturbojpeg0-dev libopencv-dev build-essential
}

ensure_slurm() {
  # tests/test_slurm.py starts a real single-node Slurm cluster from these Debian packages
  # (it skips, saying why, where they cannot be installed).
  if command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ]; then return; fi
  if ! command -v apt-get >/dev/null; then echo "env.sh: no apt-get: the Slurm tests will be skipped" >&2; return; fi
  echo "env.sh: installing Slurm and munge with apt-get (about 20 s)" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge \
    || echo "env.sh: could not install Slurm: the Slurm tests will be skipped" >&2
}

setup() {
  if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    return
  fi
  ensure_venv_module
  ensure_ffcv_build_deps
  echo "env.sh: building $VENV (PyTorch is large: a few minutes the first time)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test,deepspeed,ffcv]'
  touch "$STAMP"
}

task=${1:-}
shift || true
setup
case "$task" in
  setup) ;;
  pretrain) exec "$VENV/bin/maescale" pretrain --config configs/pretrain/demo.yaml "$@" ;;
  # Two workers: most tests wait on process start-up and gloo, so two overlap on two cores;
  # one module per worker keeps each module's fixtures (runs, betons, the Slurm cluster) built once.
  # MAESCALE_TEST_WORKERS=0 runs them in this process.
  test) ensure_slurm; exec "$VENV/bin/python" -m pytest -n "${MAESCALE_TEST_WORKERS:-2}" --dist loadscope "$@" ;;
  *) echo "usage: bash launchers/env.sh {setup|pretrain|test} [args...]" >&2; exit 2 ;;
esac
