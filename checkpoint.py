"""Checkpoints as plain data: atomic writes, safe loads, and the model rebuilt from the stored config.

A checkpoint is a dict of tensors and plain Python values (no pickled classes), loaded with
`torch.load(weights_only=True)`. Keys: format_version, config (the resolved training flags),
step, model, optimizer, buffer, rng, best_valid_acc, and a checksum of the rest checked on load.
"""
import os
import pickle
import shutil
import tempfile
import zlib

import torch

from data import dataset_info
from models import ARCH_SETTINGS, build_model
from models.judge import JUDGE_ARCH, build_judge

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """Missing, corrupt, foreign or mismatched checkpoint: reported as one line by the scripts."""


class DamagedCheckpoint(CheckpointError):
    """Empty, truncated, or unzipping to other bytes than were written."""


def checksum(obj):
    """CRC-32 over every tensor's dtype, shape and bytes and every other value, in key order. Stored
    in the checkpoint and checked on load, it catches what the zip container lets through: a bad
    sector or a half-synced copy that still unzips but holds other numbers."""
    crc = 0

    def walk(o):
        nonlocal crc
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
            if t.numel():
                crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                crc = zlib.crc32(repr(k).encode(), crc)
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            crc = zlib.crc32(repr(o).encode(), crc)
    walk(obj)
    return crc


def save_atomic(obj, path, rotate_to=None):
    """Write to a temp file in the same directory, fsync, then rename: a reader (or a crash at any
    moment) sees the old file or the new one, never half of one. A write that fails (disk full)
    leaves no temp file and the old file untouched. With rotate_to, the old file is first kept
    there too, so the previous checkpoint survives beside the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer hides a failed write behind its own error
                raise _os_error_behind(e) or e
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        if rotate_to and os.path.exists(path):
            _keep_as(path, rotate_to)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _keep_as(path, copy_path):
    """Make copy_path hold path's file, atomically, while path keeps it: a hard link (a copy where
    the filesystem has none). Renaming path away instead left a moment with no last.pt at all, and
    a kill -9 there (the kill test caught one) left a run whose last.pt was gone."""
    if os.path.exists(copy_path) and os.path.samefile(path, copy_path):
        return  # already the same file (a write was cut short after keeping it); a rename would be a no-op
    tmp = copy_path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy_path)


def _os_error_behind(e):
    """The OSError (disk full, file too large, I/O error) an exception was raised while handling."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save_checkpoint(ckpt, path, rotate_to=None):
    """save_atomic with the checksum that load_checkpoint verifies."""
    save_atomic({**ckpt, "checksum": checksum(ckpt)}, path, rotate_to)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; its legacy format, a pickle (0x80)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint as plain data; every way a file can fail to be one is a CheckpointError
    whose message says which (missing, empty, not PyTorch, truncated, holding code, foreign)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedCheckpoint(f"'{path}' is empty (a write that never finished?)")
    if head != ZIP_MAGIC and head[:1] != b"\x80":
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (it does not start as torch.save's "
                              "zip archive does)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"'{path}' was written by another program: it holds Python objects, "
                              "not plain data, and is not loaded (weights_only)") from None
    except Exception as e:
        first_sentence = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"'{path}' is truncated or damaged ({first_sentence})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"'{path}' is a PyTorch file written by another program, not a "
                              "checkpoint of train_jem.py")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has format version {ckpt['format_version']}; this code "
                              f"reads up to {FORMAT_VERSION}: update the code")
    stored = ckpt.pop("checksum", None)  # None: written before checksums
    if stored is not None and checksum(ckpt) != stored:
        raise DamagedCheckpoint(f"'{path}' is damaged: its contents do not match the checksum written "
                                "with them")
    return ckpt


RESUMABLE = ("last.pt", "prev.pt", "best.pt")  # each a whole run state; train_jem.py writes them


def load_resumable(run_dir):
    """The newest checkpoint of a run that loads and verifies, among last.pt, prev.pt (the one
    before it) and best.pt: (checkpoint, its file name, {file: why it was passed over}). A damaged
    file is renamed <name>.damaged: kept for inspection, out of the rotation, so the next write
    does not rotate it into prev.pt. CheckpointError, naming each file's fault, when none is usable."""
    best, name, faults = None, None, {}
    for candidate in RESUMABLE:
        path = os.path.join(run_dir, candidate)
        if not os.path.exists(path):
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            faults[candidate] = str(e)
            if isinstance(e, DamagedCheckpoint):
                os.replace(path, path + ".damaged")
            continue
        if best is None or ckpt["step"] > best["step"]:
            best, name = ckpt, candidate
    if best is None:
        why = "; ".join(faults.values()) or f"no checkpoint in '{run_dir}'"
        raise CheckpointError(f"nothing to resume: {why}")
    return best, name, faults


def sgld_step_rule(config):
    """The SGLDSampler step settings of a training config: samplers outside training (sample.py,
    eval_jem.py) take them from here, so none of them can miss one."""
    return dict(step_size=config["step_size"], noise_std=config["noise_std"], clamp=config["clamp"],
                grad_clip=config.get("grad_clip"))


def model_kwargs(config, info):
    """The build_model arguments a training config implies (stored, so sample.py can replay them)."""
    sizes = {k: config[k] for k in ARCH_SETTINGS[config["arch"]]}
    return dict(arch=config["arch"], n_classes=info.n_classes, in_channels=info.channels,
                norm=config["norm"], dropout=config["dropout"],
                activation=config.get("activation", "leaky_relu"),  # older checkpoints: leaky ReLU
                learn_temperature=config.get("learn_temperature", False), **sizes)


def recorded_config(config):
    """The settings a run records (config.json, checkpoints): those that apply to it. The other
    architecture's sizes, SGD's momentum under Adam and the length of a step ramp that is off are
    left out, not stored as if they had been used. Checkpoints that hold them still load."""
    unused = {k for arch, keys in ARCH_SETTINGS.items() if arch != config["arch"] for k in keys}
    if config.get("optimizer") != "sgd":
        unused.add("momentum")
    if config.get("steps_from") is None:
        unused.add("steps_ramp")
    return {k: v for k, v in config.items() if k not in unused}


def load_model_state(model, state, path="checkpoint"):
    """load_state_dict with a one-line error when the weights belong to another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        missing = sum("Missing key" in l or "size mismatch" in l or "Unexpected key" in l
                      for l in str(e).splitlines())
        raise CheckpointError(f"the weights in '{path}' do not fit the model built from its config "
                              f"(another architecture? {missing} kinds of mismatch)") from None


def model_from_checkpoint(ckpt, info, device, path="checkpoint"):
    """Rebuild the network from the config stored in the checkpoint and load its weights."""
    model = build_model(**model_kwargs(ckpt["config"], info)).to(device)
    load_model_state(model, ckpt["model"], path)
    return model


def load_judge(path, device):
    """The judge classifier (tools/train_classifier.py) in a checkpoint, in eval mode."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    if config.get("arch") != JUDGE_ARCH:
        raise CheckpointError(f"'{path}' is not a judge checkpoint written by tools/train_classifier.py")
    model = build_judge(config, dataset_info(config["dataset"])).to(device)
    load_model_state(model, ckpt["model"], path)
    return model.eval()
