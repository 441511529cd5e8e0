"""What the command-line scripts share: device choice and one-line errors instead of tracebacks."""
import os
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


def has_fast_bf16(device):
    """Whether bf16 arithmetic is native here: a CUDA device with bf16 (Ampere and later), or a CPU
    with AVX-512 BF16 or AMX (oneDNN then runs bf16 convolutions; elsewhere they are emulated and
    slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell, so not assumed
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name, device):
    """--precision auto|fp32|bf16 -> 'fp32' or 'bf16' for this device."""
    if name == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return name


def run(main):
    """Call main(); expected failures become 'error: ...' on stderr and exit status 2. A reader
    that leaves early (`python eval_jem.py ... | head`) ends the script quietly, as it ends Unix
    tools, instead of with a BrokenPipeError traceback."""
    try:
        try:
            return main()
        finally:  # on SystemExit too: buffered output meets the closed pipe here, not at exit
            sys.stdout.flush()
    except (CheckpointError, DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush then has nowhere to fail
        sys.exit(1)
