"""tcmalloc for CPU jobs: glibc's malloc makes the tiny model's training steps page-fault bound.

glibc maps every block above 32 MiB afresh and unmaps it when freed, so each pass over the tiny
model's logits (a few hundred positions x the 152k vocabulary, 170 MB) first pays a page fault
per 4 KiB page; tcmalloc reuses the freed memory. An SFT step takes 0.63x the time
(bench/cpu_allocator.py); the results are the same. tcmalloc keeps freed memory mapped, so a
process's RSS under it is not what glibc would show: memory measurements run without it
(bench/host_memory.py refuses a tcmalloc preload).

    python -m deepeyes.allocator COMMAND [ARGS...]    # COMMAND with tcmalloc preloaded, where installed

`make run` starts the main job this way; bench/learning.py runs its jobs with `allocator_env()`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it).
TCMALLOC = "tcmalloc_minimal"


def allocator_env() -> dict[str, str]:
    """This process's environment with tcmalloc put in front of LD_PRELOAD, where installed (and
    not preloaded already); unchanged otherwise."""
    library, preload = ctypes.util.find_library(TCMALLOC), os.environ.get("LD_PRELOAD", "")
    if not library or "tcmalloc" in preload:
        return dict(os.environ)
    return os.environ | {"LD_PRELOAD": f"{library} {preload}".strip()}


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m deepeyes.allocator COMMAND [ARGS...]")
    env = allocator_env()
    if "tcmalloc" not in env.get("LD_PRELOAD", ""):
        print("tcmalloc not found (Debian: libtcmalloc-minimal4): running with glibc's malloc, slower", file=sys.stderr)
    os.execvpe(sys.argv[1], sys.argv[1:], env)


if __name__ == "__main__":
    main()
