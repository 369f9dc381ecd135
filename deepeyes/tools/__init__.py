"""The model's tools: a sandboxed Python notebook per trajectory, and local text/image search."""

from deepeyes.tools.code_worker import CodeLimits, CodeWorker, CodeWorkerError
from deepeyes.tools.sandbox_client import (
    CodeResult, SandboxClient, SandboxError, SandboxLimits, SandboxSession, daemon_command, local_sandbox,
)

from deepeyes.tools.search import LocalImageSearch, LocalTextSearch, sha256_file

__all__ = [
    "CodeLimits",
    "CodeResult",
    "CodeWorker",
    "CodeWorkerError",
    "LocalImageSearch",
    "LocalTextSearch",
    "SandboxClient",
    "SandboxError",
    "SandboxLimits",
    "SandboxSession",
    "daemon_command",
    "local_sandbox",
    "sha256_file",
]
