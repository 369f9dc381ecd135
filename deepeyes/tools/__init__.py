"""The model's tools: a sandboxed Python notebook per trajectory, and local text/image search."""

from deepeyes.tools.sandbox_client import (
    CodeResult, LocalSandbox, SandboxClient, SandboxError, SandboxLimits, SandboxPool, SandboxSession, SandboxUnreachable,
    connect_sandbox, daemon_command,
)
from deepeyes.tools.search import LocalImageSearch, LocalTextSearch, sha256_file

__all__ = [
    "CodeResult",
    "LocalImageSearch",
    "LocalSandbox",
    "LocalTextSearch",
    "SandboxClient",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxSession",
    "SandboxUnreachable",
    "connect_sandbox",
    "daemon_command",
    "sha256_file",
]
