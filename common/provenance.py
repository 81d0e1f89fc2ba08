"""What reproduces a run: the fedblock revision, the versions of the packages that shape the numbers,
and the machine. The coordinator writes them into summary.json; a worker sends its machine at Join."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("fedblock", "torch", "transformers", "peft", "safetensors", "tokenizers", "grpcio", "protobuf", "numpy",
            "zstandard", "prometheus-client")
_SOURCE = Path(__file__).resolve().parent.parent


def packages() -> dict[str, str | None]:
    """Installed versions of PACKAGES (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def revision() -> str | None:
    """The git commit of the fedblock sources in use, with "-dirty" when they have local changes; None
    outside a git checkout (an installed wheel)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()

        if Path(git("rev-parse", "--show-toplevel")).resolve() != _SOURCE:
            return None  # the sources sit inside some other repository
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def accelerator() -> str:
    """The first CUDA device, named with its memory; "" when there is none."""
    import torch

    if not torch.cuda.is_available():
        return ""
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB" + (f" (x{count})" if count > 1 else "")


def hardware() -> dict:
    """This machine, as the Hardware message and summary.json hold it."""
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count() or 0,
        "memory_bytes": memory_bytes(),
        "accelerator": accelerator(),
    }
