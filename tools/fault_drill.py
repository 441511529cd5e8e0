"""Fault drill: many short real training runs with injected faults; do they all finish?
And what does the guard cost a healthy step?

    python -m tools.fault_drill --data-root ../shared/data --runs 20          # divergences
    python -m tools.fault_drill --data-root ../shared/data --runs 20 --disk   # kills and damaged checkpoints
    python -m tools.fault_drill --data-root ../shared/data --cost             # healthy steps, guard on vs off
    python -m tools.fault_drill --checkpoint-cost                             # checksums and rotation: cost

Each run trains a small ResNet JEM on 2,000 real MNIST images for --steps steps, seeded by the run
index. Divergence drill: one to three faults (a NaN in a weight, or a 10^4 x learning-rate spike) at
random steps; the run must finish with finite weights. Disk drill: the run is resumed until it
finishes, and each segment meets a random fate: SIGKILL at a random moment (mid-step or mid-write),
a full disk (a file-size limit under which every checkpoint write fails) and then SIGKILL or the
end, or nothing; between segments last.pt may get random bytes overwritten or be truncated. The
table gives the steps each resume lost and the final accuracy beside an undisturbed run of the same
seed (resume is exact, so they must agree). Exits non-zero if any run did not finish.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

from recovery import FAULTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train_jem.py runs from there


def train_cmd(i, args, root, name, ckpt_every=25):
    return [sys.executable, os.path.join(REPO, "train_jem.py"), "--dataset", "mnist", "--data-root", args.data_root,
            "--arch", "resnet", "--width", "8", "--train-subset", "2000", "--n-valid", "500", "--batch-size", "32",
            "--n-steps", "5", "--buffer-size", "1000", "--px-weight", "0", "--pxy-weight", "1", "--clamp",
            "--buffer-init", "data", "--l2-energy", "0.01", "--lr", "1e-3", "--warmup-iters", "10",
            "--epochs", "100", "--max-iters", str(args.steps), "--eval-every", "100000", "--sample-every", "0",
            "--snapshot-every", "20", "--ckpt-every", str(ckpt_every), "--seed", str(i), "--run-name", name,
            "--ckpt-root", os.path.join(root, "ck"), "--samples-root", os.path.join(root, "sm"), "--device", "cpu"]


def metrics_of(root, name):
    path = os.path.join(root, "ck", name, "metrics.jsonl")
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


def test_acc_of(root, name):
    test = [l for l in metrics_of(root, name) if l["kind"] == "test"]
    return test[-1]["test_acc"] if test else None


def drill_run(i, args, root):
    rng = random.Random(i)
    faults = sorted({f"{rng.randrange(5, args.steps - 5)}:{rng.choice(FAULTS)}" for _ in range(rng.randint(1, 3))},
                    key=lambda f: int(f.split(":")[0]))
    name = f"drill{i}"
    cmd = train_cmd(i, args, root, name)
    for f in faults:
        cmd += ["--inject-fault", f]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    events = [l for l in metrics_of(root, name) if l["kind"] == "recovery"]
    acc = test_acc_of(root, name)
    return {"run": i, "faults": " ".join(faults), "finished": r.returncode == 0 and acc is not None,
            "events": len(events), "triggers": "; ".join(sorted({e["trigger"] for e in events})),
            "test_acc": acc}


DISK_FULL = 1 << 20  # bytes a process may write to one file: logs fit, no checkpoint does


def _disk_full():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL, DISK_FULL))  # writes beyond: EFBIG


def damage(path, rng):
    """Overwrite 64 random bytes of the file's second half (a bad sector), or cut it short."""
    data = bytearray(open(path, "rb").read())
    if rng.random() < 0.5:
        for _ in range(64):
            data[rng.randrange(len(data) // 2, len(data))] ^= 0x5A
        kind = "bytes"
    else:
        data, kind = data[:rng.randrange(len(data))], "truncated"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return kind


def disk_drill_run(i, args, root, max_segments=12):
    """Resume run i until it finishes, through kills, a full disk and damaged checkpoints."""
    import signal
    import time

    from checkpoint import RESUMABLE
    from train_jem import last_logged_step
    rng, name = random.Random(1000 + i), f"disk{i}"
    subprocess.run(train_cmd(i, args, root, f"ref{i}", args.ckpt_every), capture_output=True, cwd=REPO)
    run_dir, events, lost, finished, full_pending = os.path.join(root, "ck", name), [], [], False, False
    for segment in range(max_segments):
        logged = last_logged_step(os.path.join(run_dir, "metrics.jsonl"))
        # as a user would: --resume when a checkpoint exists, else the same command again
        resume = any(os.path.exists(os.path.join(run_dir, f)) for f in RESUMABLE)
        cmd = train_cmd(i, args, root, name, args.ckpt_every) + ["--log-every", "1"] + (["--resume"] if resume else [])
        # a full disk's loss shows at the next resume that gets going: a segment killed in start-up,
        # before it resumed, passes it on
        after_full = full_pending
        if segment and not resume:
            lost.append((logged, after_full))  # no checkpoint to go on from: the run starts again
        fates = ["kill", "full"] if segment == 0 else ["kill", "kill", "full", "none"]  # a fault at least
        fate = "none" if segment == max_segments - 1 else rng.choice(fates)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_disk_full if fate == "full" else None)
        if fate in ("kill", "full"):
            try:
                proc.wait(timeout=rng.uniform(3, 3 + args.kill_window))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        resumed = [l for l in err.splitlines() if l.startswith("resumed '")]
        if resumed:
            lost.append((logged - int(resumed[-1].rsplit(" ", 1)[1]), after_full))
        if resumed or not resume:
            full_pending = False  # this segment went on from a checkpoint (or from scratch)
        full_pending = full_pending or fate == "full"
        events.append(f"{fate}:killed" if proc.returncode == -signal.SIGKILL else
                      fate if proc.returncode == 0 else f"{fate}:exit {proc.returncode}")
        if proc.returncode == 0 and test_acc_of(root, name) is not None:
            finished = True
            break
        last = os.path.join(run_dir, "last.pt")
        if os.path.exists(last) and rng.random() < 0.5:
            events.append(f"last.pt {damage(last, rng)}")
        time.sleep(0.1)
    acc, ref = test_acc_of(root, name), test_acc_of(root, f"ref{i}")
    return {"run": i, "events": ", ".join(events), "finished": finished, "lost": lost,
            "test_acc": acc, "ref_acc": ref}


def guard_cost(args):
    """Median seconds per healthy JEM step of the mnist-cpu preset (JEM phase) with the guard
    (gradient norm, health check, snapshots every --snapshot-every steps) and without it (the
    loss's .item() as the step's one sync), in alternating blocks in one process."""
    import statistics
    import time

    import torch

    import train_jem
    from checkpoint import model_kwargs, sgld_step_rule
    from data import dataset_info, load_jem_data
    from models import build_model
    from recovery import Guard
    from sgld import ReplayBuffer, SGLDSampler

    cfg, _ = train_jem.resolve_config(["--preset", "mnist-cpu", "--pretrain-epochs", "0", "--device", "cpu"])
    info = dataset_info(cfg.dataset)
    data = load_jem_data(cfg.dataset, args.data_root, "cpu", cfg.n_valid)
    torch.manual_seed(0)
    model = build_model(**model_kwargs(vars(cfg), info))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    buffer = ReplayBuffer(cfg.buffer_size, (info.channels, info.image_size, info.image_size),
                          n_classes=info.n_classes, device="cpu")
    iters_per_epoch = len(data.train_x) // cfg.batch_size
    sampler = SGLDSampler(cfg.n_steps, **sgld_step_rule(vars(cfg)))
    guard = Guard(snapshot_every=cfg.snapshot_every)

    def state():
        return {"step": 0, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "buffer": buffer.state_dict()}

    def one_step(step, guarded):
        batch = train_jem.training_batch(data, cfg, info, step, iters_per_epoch, "cpu")
        loss, metrics, _ = train_jem.jem_loss(model, sampler, buffer, cfg, batch, energy_on=True)
        if not guarded:
            loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if guarded:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            assert guard.check(guard.health_stats(loss, metrics, norm).tolist()) is None
            guard.maybe_snapshot(step, state, checkpointed=step % cfg.ckpt_every == 0)
        optimizer.step()

    times, step = {False: [], True: []}, 0
    for r in range(args.rounds + 1):
        for guarded in (False, True) if r % 2 else (True, False):
            t = time.perf_counter()
            for _ in range(args.block):
                one_step(step, guarded)
                step += 1
            if r > 0:  # round 0 warms up
                times[guarded].append((time.perf_counter() - t) / args.block)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"mnist-cpu JEM step, {args.rounds} rounds of {args.block} steps per side, snapshot every "
          f"{cfg.snapshot_every} steps\n")
    print("| side | median s/step | min | max |\n|---|---|---|---|")
    for name, key in (("guard off", False), ("guard on", True)):
        print(f"| {name} | {statistics.median(times[key]):.4f} | {min(times[key]):.4f} | {max(times[key]):.4f} |")
    print(f"\nratio guard on / off: {on / off:.3f}")


def checkpoint_cost(args):
    """Write and read times of a checkpoint of the mnist-cpu preset's size (model, Adam state,
    10,000-chain buffer), plain (before checksums and rotation) against checksummed and rotated,
    in alternating rounds; and the disk a run's checkpoints take."""
    import statistics
    import time

    import torch

    import train_jem
    from checkpoint import FORMAT_VERSION, checksum, load_checkpoint, model_kwargs, save_atomic, save_checkpoint
    from data import dataset_info
    from models import build_model

    cfg, _ = train_jem.resolve_config(["--preset", "mnist-cpu", "--device", "cpu"])
    info = dataset_info(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(**model_kwargs(vars(cfg), info))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # Adam's moments exist, as in a checkpoint of a running job
    state = {"format_version": FORMAT_VERSION, "config": vars(cfg), "step": 1, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "buffer": {"x": torch.rand(cfg.buffer_size, 1, 28, 28),
                                                               "n_classes": 10, "updates": 1}}
    times = {k: [] for k in ("plain write", "verified write", "plain read", "verified read", "checksum")}
    with tempfile.TemporaryDirectory() as d:
        last, prev = os.path.join(d, "last.pt"), os.path.join(d, "prev.pt")
        for r in range(args.rounds + 1):
            for verified in (False, True) if r % 2 else (True, False):
                t = time.perf_counter()
                if verified:
                    save_checkpoint(state, last, rotate_to=prev)
                else:
                    save_atomic(state, last)
                write = time.perf_counter() - t
                t = time.perf_counter()
                if verified:
                    load_checkpoint(last)
                else:
                    torch.load(last, weights_only=True)
                read = time.perf_counter() - t
                if r > 0:
                    kind = "verified" if verified else "plain"
                    times[f"{kind} write"].append(write)
                    times[f"{kind} read"].append(read)
            t = time.perf_counter()
            checksum(state)
            times["checksum"].append(time.perf_counter() - t)
        size = os.path.getsize(last)
    print(f"mnist-cpu checkpoint ({size / 2**20:.1f} MiB), {args.rounds} rounds per side\n")
    print("| | median s | min | max |\n|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.4f} | {min(v):.4f} | {max(v):.4f} |")
    print(f"\ndisk per run: {2 * size / 2**20:.1f} MiB before (last.pt, best.pt), "
          f"{3 * size / 2**20:.1f} MiB now (last.pt, prev.pt, best.pt)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="holds mnist/{train,test}.npz (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="number of runs, seeds 0..runs-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=80, help="training steps per run (default: %(default)s)")
    p.add_argument("--disk", action="store_true", help="the disk drill: kills, a full disk, damaged checkpoints")
    p.add_argument("--ckpt-every", type=int, default=10, help="--disk: steps between checkpoints (default: %(default)s)")
    p.add_argument("--kill-window", type=float, default=6.0,
                   help="--disk: a kill falls 3 to 3 + this many seconds into a segment (default: %(default)s)")
    p.add_argument("--cost", action="store_true", help="instead, time healthy steps with and without the guard")
    p.add_argument("--checkpoint-cost", action="store_true",
                   help="instead, time checkpoint writes and reads with and without checksum and rotation")
    p.add_argument("--rounds", type=int, default=10, help="--cost: timed rounds per side (default: %(default)s)")
    p.add_argument("--block", type=int, default=20, help="--cost: steps per round (default: %(default)s)")
    args = p.parse_args()
    if args.cost:
        return guard_cost(args)
    if args.checkpoint_cost:
        return checkpoint_cost(args)
    if args.disk:
        return disk_drill(args)
    with tempfile.TemporaryDirectory() as root:
        rows = []
        print("| run | injected faults | recovery events | triggers | finished | test acc |")
        print("|---|---|---|---|---|---|")
        for i in range(args.runs):
            row = drill_run(i, args, root)
            rows.append(row)
            acc = "-" if row["test_acc"] is None else f"{row['test_acc']:.3f}"
            print(f"| {i} | {row['faults']} | {row['events']} | {row['triggers']} | {row['finished']} | {acc} |",
                  flush=True)
    done = sum(r["finished"] for r in rows)
    print(f"\n{done} of {len(rows)} runs with injected faults recovered and finished "
          f"({sum(r['events'] for r in rows)} recovery events)")
    sys.exit(0 if done == len(rows) else 1)


def disk_drill(args):
    with tempfile.TemporaryDirectory() as root:
        rows = []
        print(f"{args.steps} steps per run, a checkpoint every {args.ckpt_every}\n")
        print("| run | segments' fates and damage | finished | steps lost at each resume | test acc | undisturbed |")
        print("|---|---|---|---|---|---|")
        for i in range(args.runs):
            r = disk_drill_run(i, args, root)
            rows.append(r)
            fmt = lambda a: "-" if a is None else f"{a:.4f}"  # noqa: E731
            lost = " ".join(f"{n}*" if full else str(n) for n, full in r["lost"]) or "-"
            print(f"| {i} | {r['events']} | {r['finished']} | {lost} | "
                  f"{fmt(r['test_acc'])} | {fmt(r['ref_acc'])} |", flush=True)
    done = sum(r["finished"] for r in rows)
    same = sum(r["test_acc"] == r["ref_acc"] for r in rows if r["finished"])
    worst = max([n for r in rows for n, full in r["lost"] if not full] or [0])
    print(f"\n{done} of {len(rows)} runs finished; {same} with the undisturbed run's test accuracy; "
          f"at most {worst} steps lost at a resume after a kill or damage (2 x --ckpt-every = "
          f"{2 * args.ckpt_every}); * after a segment under a full disk, where every step since the "
          "last checkpoint written before it is lost")
    sys.exit(0 if done == len(rows) and same == done and worst <= 2 * args.ckpt_every else 1)


if __name__ == "__main__":
    main()
