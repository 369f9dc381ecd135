"""The model's tools: a sandboxed Python notebook per trajectory, and local text/image search."""

from deepeyes.tools.code_worker import CodeLimits, CodeResult, CodeWorker, CodeWorkerError
from deepeyes.tools.search import LocalImageSearch, LocalTextSearch, sha256_file

__all__ = [
    "CodeLimits",
    "CodeResult",
    "CodeWorker",
    "CodeWorkerError",
    "LocalImageSearch",
    "LocalTextSearch",
    "sha256_file",
]
