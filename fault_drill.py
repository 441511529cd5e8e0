"""Fault drill: many short real training runs with injected divergences; do they all recover?

    python fault_drill.py --data-root ../shared/data --runs 20

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="holds mnist/{train,test}.npz (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="number of runs, seeds 0..runs-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=80, help="training steps per run (default: %(default)s)")
    args = p.parse_args()
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
