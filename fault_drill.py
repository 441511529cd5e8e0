"""Fault drill: many short real training runs with injected divergences; do they all recover?
And what does the guard cost a healthy step?

    python fault_drill.py --data-root ../shared/data --runs 20
    python fault_drill.py --data-root ../shared/data --cost        # healthy steps, guard on vs off

Each run trains a small ResNet JEM on 2,000 real MNIST images for --steps steps with one to three
faults (a NaN in a weight, or a 10^4 x learning-rate spike) at random steps, seeded by the run
index, and must finish with finite weights. Prints one row per run and the recovery rate; exits
non-zero if any run did not finish.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

from recovery import FAULTS

REPO = os.path.dirname(os.path.abspath(__file__))


def drill_run(i, args, root):
    rng = random.Random(i)
    faults = sorted({f"{rng.randrange(5, args.steps - 5)}:{rng.choice(FAULTS)}" for _ in range(rng.randint(1, 3))},
                    key=lambda f: int(f.split(":")[0]))
    name = f"drill{i}"
    cmd = [sys.executable, os.path.join(REPO, "train_jem.py"), "--dataset", "mnist", "--data-root", args.data_root,
           "--arch", "resnet", "--width", "8", "--train-subset", "2000", "--n-valid", "500", "--batch-size", "32",
           "--n-steps", "5", "--buffer-size", "1000", "--px-weight", "0", "--pxy-weight", "1", "--clamp",
           "--buffer-init", "data", "--l2-energy", "0.01", "--lr", "1e-3", "--warmup-iters", "10",
           "--epochs", "100", "--max-iters", str(args.steps), "--eval-every", "100000", "--sample-every", "0",
           "--snapshot-every", "20", "--ckpt-every", "25", "--seed", str(i), "--run-name", name,
           "--ckpt-root", os.path.join(root, "ck"), "--samples-root", os.path.join(root, "sm"), "--device", "cpu"]
    for f in faults:
        cmd += ["--inject-fault", f]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [json.loads(l) for l in open(os.path.join(root, "ck", name, "metrics.jsonl"))]
    events = [l for l in lines if l["kind"] == "recovery"]
    test = [l for l in lines if l["kind"] == "test"]
    return {"run": i, "faults": " ".join(faults), "finished": r.returncode == 0 and bool(test),
            "events": len(events), "triggers": "; ".join(sorted({e["trigger"] for e in events})),
            "test_acc": test[0]["test_acc"] if test else None}


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="holds mnist/{train,test}.npz (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="number of runs, seeds 0..runs-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=80, help="training steps per run (default: %(default)s)")
    p.add_argument("--cost", action="store_true", help="instead, time healthy steps with and without the guard")
    p.add_argument("--rounds", type=int, default=10, help="--cost: timed rounds per side (default: %(default)s)")
    p.add_argument("--block", type=int, default=20, help="--cost: steps per round (default: %(default)s)")
    args = p.parse_args()
    if args.cost:
        return guard_cost(args)
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


if __name__ == "__main__":
    main()
