"""A training run's state in one object: what a checkpoint holds, what `--resume` restores and
what a rollback goes back to.

`RunState` owns the model, the optimizer, the replay buffer, the divergence guard, the step, the
best validation accuracy and the random number generators. Two views of it:

- `training_state()`: this process's model, optimizer, buffer and step. A rollback after a
  divergence restores it (`recovery.roll_back`); the guard's count of recoveries, the best
  validation accuracy and the checkpoints written stay as they are.
- `state_dict()`: the whole run, one checkpoint. Under torchrun every rank's buffer shard and RNG
  state are gathered on rank 0 in a layout that does not depend on the number of ranks
  (distributed.py), so `load_state_dict` can resume on another number of ranks.

`save(name)` writes `state_dict()` atomically (checkpoint.save_checkpoint), keeping last.pt's
predecessor as prev.pt.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import FORMAT_VERSION, load_model_state, recorded_config, save_checkpoint
from distributed import gather_buffer, gather_objects, rank_seed, shard_of
from recovery import host_copy


def rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunState:
    def __init__(self, cfg, model, optimizer, buffer, guard, ranks, device, run_dir):
        self.cfg, self.model, self.optimizer, self.buffer, self.guard = cfg, model, optimizer, buffer, guard
        self.ranks, self.device, self.run_dir = ranks, device, run_dir
        self.step, self.best_valid_acc = 0, -1.0
        self.started = time.time()  # moved back by the elapsed time of the segments before a resume
        self.saved = {}  # file name -> the step it holds, of this process's writes that succeeded
        self.written = True  # whether the last write of last.pt succeeded

    @property
    def elapsed_s(self):
        """Wall time of the whole run, every segment before a resume included."""
        return time.time() - self.started

    # ---- what a rollback restores ------------------------------------------------------------

    def training_state(self):
        return {"step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict()}

    def restore(self, snapshot):
        snapshot = host_copy(snapshot)  # a copy: on CPU, loading would alias the snapshot's tensors
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.buffer.load_state_dict(snapshot["buffer"])
        self.step = snapshot["step"]

    # ---- the whole run: checkpoints -----------------------------------------------------------

    def state_dict(self):
        """The run's checkpoint on rank 0 (None on the others). Every rank must call it."""
        shard = self.buffer.state_dict()
        whole = gather_buffer(self.ranks, shard["x"], self.buffer.n_classes)
        rngs = gather_objects(self.ranks, rng_state(self.device))
        if not self.ranks.main:
            return None
        return {"format_version": FORMAT_VERSION, "config": recorded_config(vars(self.cfg)),
                "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": {**shard, "x": whole},
                "rng": rngs[0], "rng_ranks": rngs, "world_size": self.ranks.world,
                "best_valid_acc": self.best_valid_acc, "elapsed_s": self.elapsed_s,
                "recovery": self.guard.state_dict()}

    def load_state_dict(self, ckpt, path):
        """Continue from a checkpoint of state_dict(), possibly written by another number of ranks."""
        load_model_state(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        ranks = self.ranks
        try:
            whole = ckpt["buffer"]["x"]
            self.buffer.load_state_dict({**ckpt["buffer"], "x": shard_of(whole, self.buffer.n_classes,
                                                                         ranks.rank, ranks.world)})
        except (ValueError, RuntimeError) as e:  # e.g. resumed with --pxy-weight after a run without
            print(f"warning: {e}; starting a fresh replay buffer", file=sys.stderr)  # class slices
        rngs = ckpt.get("rng_ranks", [ckpt["rng"]])
        if ranks.rank < len(rngs):
            set_rng_state(rngs[ranks.rank], self.device)
        else:  # more ranks than wrote the checkpoint: the new ones get fresh seeds
            torch.manual_seed(rank_seed(self.cfg.seed + ckpt["step"], ranks.rank))
        self.step, self.best_valid_acc = ckpt["step"], ckpt["best_valid_acc"]
        self.started -= ckpt.get("elapsed_s", 0.0)
        if "recovery" in ckpt:
            self.guard.load_state_dict(ckpt["recovery"])

    def save(self, name):
        """Write the run to run_dir/name (on rank 0; every rank must call it). last.pt's predecessor
        is kept as prev.pt, so a last.pt damaged later costs one interval. A failed write (disk full)
        keeps the file before it and training goes on: the state in memory is sound, and the next
        interval tries again. Returns whether it was written."""
        ckpt = self.state_dict()
        if ckpt is None:
            return True
        path = os.path.join(self.run_dir, name)
        try:
            save_checkpoint(ckpt, path, rotate_to=os.path.join(self.run_dir, "prev.pt") if name == "last.pt" else None)
        except OSError as e:
            kept = (f"{path} still holds step {self.saved[name]}" if name in self.saved else
                    f"{path} still holds what it held before" if os.path.exists(path) else
                    "no checkpoint is written yet")
            tqdm.write(f"warning: could not write {path} at step {self.step} ({e.strerror or e}); {kept}; "
                       "training goes on and tries again at the next checkpoint", file=sys.stderr)
            return False
        self.saved[name] = self.step
        return True

    def save_last(self):
        """save("last.pt"), remembering whether it was written (the run's exit status says so)."""
        self.written = self.save("last.pt")
        return self.written
