"""What the command-line scripts share: device choice and one-line errors instead of tracebacks."""
import sys

import torch

from checkpoint import CheckpointError
from data import DataError


class UsageError(Exception):
    """A flag combination or environment that cannot work (e.g. --device cuda without a GPU)."""


def resolve_device(name):
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def run(main):
    """Call main(); expected failures become 'error: ...' on stderr and exit status 2."""
    try:
        return main()
    except (CheckpointError, DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
