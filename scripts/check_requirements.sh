#!/usr/bin/env bash
# Checks, without downloading a GPU wheel, that both install paths resolve:
#   - the GPU set, `pip install -e '.[gpu]'` on Linux x86_64 / CPython 3.11 (vLLM, CUDA torch);
#   - the CPU set, the package's ranges under the exact pins of constraints/cpu.txt (setup.sh's path).
# pip cannot do the first here: the index this machine reaches serves no PEP 658 metadata, and
# `pip install --dry-run --report` fetched every wheel of the set (1.9 GB, pip 23.2 and 26.3 alike);
# pip 26.3's `--use-feature=fast-deps` avoids that but took 46 s. uv's resolver reads only the
# index pages and each wheel's METADATA by HTTP range request: about 92 MB in 5-8 s, measured.
# Writes the resolved sets to $OUT (default .cache/requirements/) and prints the key versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
TOOLS=.cache/tools
OUT=${OUT:-.cache/requirements}
mkdir -p "$OUT"

if ! "$TOOLS/bin/uv" --version 2>/dev/null | grep -qx "uv $UV_VERSION.*"; then
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "uv==$UV_VERSION"
fi
resolve() {  # resolve OUTPUT UV-ARGS...
  local output=$1; shift
  "$TOOLS/bin/uv" pip compile -q --no-cache --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-header --no-annotate -o "$OUT/$output" pyproject.toml "$@"
}
resolve gpu.txt --extra gpu --extra dev
resolve cpu.txt --extra dev --extra bench -c constraints/cpu.txt

pin() { grep -E "^$2==" "$OUT/$1" | cut -d= -f3; }
echo "GPU set: vllm $(pin gpu.txt vllm), torch $(pin gpu.txt torch), torchvision $(pin gpu.txt torchvision)," \
     "transformers $(pin gpu.txt transformers) ($(grep -c '==' "$OUT/gpu.txt") packages, $OUT/gpu.txt)"
echo "CPU set: torch $(pin cpu.txt torch), transformers $(pin cpu.txt transformers) ($OUT/cpu.txt)"
if [ -n "$(pin cpu.txt torchvision)" ]; then
  echo "error: the CPU set pulls torchvision $(pin cpu.txt torchvision); it must stay absent on a CPU box" >&2
  exit 1
fi
