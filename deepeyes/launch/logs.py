"""The one place a job sets up logging: the submitting process, a local run (after Hydra has
configured its handlers), and every role the node agent starts (the agent, the trainer).

INFO says what a user acts on. Libraries whose INFO is their own bookkeeping are raised to
WARNING, so their INFO shows only when the root logger is at DEBUG. Progress bars are drawn only
on a terminal (deepeyes.progress).
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
# megatron-core logs every parameter name of every gradient bucket and its whole optimizer
# config at INFO, on every rank of every run.
CHATTY_LIBRARIES = ("megatron",)


def setup_logging() -> None:
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's bars (loading and writing checkpoints), as
        # deepeyes.progress does for ours; inherited by every role this process starts.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
    debug = root.getEffectiveLevel() <= logging.DEBUG
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
