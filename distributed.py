"""Data-parallel JEM with torchrun: which process am I, and the few collectives training needs.

    torchrun --nproc_per_node 8 train_jem.py ...                      # one node, 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 train_jem.py --device cpu ...         # 2 CPU processes (gloo)

A run started without torchrun (no WORLD_SIZE in the environment) never touches
torch.distributed. With N ranks, each rank trains on its own slice of every global batch, keeps its
own shard of the replay buffer and its own SGLD randomness; DistributedDataParallel averages the
gradients. Checkpoints hold the whole buffer in a layout that does not depend on N (for a
class-conditional buffer: class by class, each class's chains in rank order), so a run can resume
on another number of ranks.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UsageError, resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        """Rank 0 writes checkpoints, metrics and pictures, and shows the progress bar."""
        return self.rank == 0

    @property
    def enabled(self):
        return self.world > 1


def setup(device_flag):
    """(Ranks, device). Under torchrun: rank r uses cuda:LOCAL_RANK with NCCL when CUDA is chosen,
    else the CPU with gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), resolve_device(device_flag)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Ranks(rank, world), device


def teardown(ranks):
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model):
    """The network inside DistributedDataParallel (the model itself in a one-process run): SGLD
    and the learned temperature bypass DDP's forward, which would average gradients they must not."""
    return getattr(model, "module", model)


def rank_seed(seed, rank):
    """Rank r's seed for its SGLD chains and buffer restarts; rank 0 keeps the run's seed, so a
    single-process run is unchanged."""
    return seed + 7_919 * rank


def check_buffer_split(size, n_classes, world, batch_size):
    """This rank's buffer size; a one-line error when the buffer does not split evenly over the
    ranks (and class slices), or when a class slice holds fewer chains than a batch, which may be
    all one class, can ask of it."""
    parts = world * (n_classes or 1)
    if size % parts:
        raise UsageError(f"--buffer-size {size} must split evenly over {world} ranks"
                         + (f" x {n_classes} class slices" if n_classes else ""))
    if n_classes and size // parts < batch_size:
        raise UsageError(f"--buffer-size {size} leaves {size // parts} chains per class"
                         f"{' per rank' if world > 1 else ''}, fewer than --batch-size {batch_size}: "
                         f"use --buffer-size {parts * batch_size} or more")
    return size // world


def health_across_ranks(ranks, stats):
    """stats = [loss, max |logit|, gap, grad norm, stop] of this rank -> the same vector for the
    whole step on every rank: mean loss and gap, largest |logit|, gradient norm and stop flag.
    A NaN on any rank propagates, so every rank takes the same rollback decision."""
    if not ranks.enabled:
        return stats
    every = [torch.empty_like(stats) for _ in range(ranks.world)]
    dist.all_gather(every, stats)
    every = torch.stack(every)
    return torch.stack([every[:, 0].mean(), every[:, 1].amax(), every[:, 2].mean(),
                        every[:, 3].amax(), every[:, 4].amax()])


def sum_across_ranks(ranks, values):
    """Element-wise sum of a float tensor over ranks (validation counts)."""
    if ranks.enabled:
        dist.all_reduce(values)
    return values


# ---- the replay buffer in a layout that does not depend on the number of ranks ------------------

def shard_of(whole, n_classes, rank, world):
    """This rank's part of a whole buffer (size S): for class-conditional buffers, its 1/world of
    every class slice, so the shard is itself a class-sliced buffer of size S / world."""
    groups = n_classes or 1
    per_group = whole.shape[0] // groups
    part = per_group // world
    return whole.view(groups, per_group, *whole.shape[1:])[:, rank * part:(rank + 1) * part].reshape(
        -1, *whole.shape[1:]).clone()


def merge_shards(shards, n_classes):
    """Inverse of shard_of: the ranks' shards (in rank order) -> the whole buffer."""
    groups = n_classes or 1
    views = [s.view(groups, s.shape[0] // groups, *s.shape[1:]) for s in shards]
    return torch.cat(views, dim=1).reshape(-1, *shards[0].shape[1:])


def gather_buffer(ranks, shard, n_classes):
    """The whole buffer on rank 0 (None elsewhere); every rank must call this."""
    if not ranks.enabled:
        return shard
    parts = [torch.empty_like(shard) for _ in range(ranks.world)] if ranks.main else None
    dist.gather(shard.contiguous(), parts, dst=0)
    return merge_shards(parts, n_classes) if ranks.main else None


def gather_objects(ranks, obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); every rank must call this."""
    if not ranks.enabled:
        return [obj]
    out = [None] * ranks.world if ranks.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(ranks, tensor):
    """Overwrite tensor on every rank with rank 0's, in place; every rank must call this."""
    if ranks.enabled:
        dist.broadcast(tensor, src=0)


def barrier(ranks):
    if ranks.enabled:
        dist.barrier()
