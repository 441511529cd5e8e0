"""Compare training runs from their metrics.jsonl: a table of windowed train loss / accuracy, the
validation accuracy and the seconds per training step, and the curves as a PNG.

    python -m tools.compare_runs checkpoints/one-rank checkpoints/two-ranks checkpoints/one-rank-seed2 \
        --window 100 --plot samples/ranks.png
"""
import argparse
import json
import os
import statistics

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import UsageError, run  # noqa: E402


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"no metrics.jsonl in '{run_dir}'")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def windows(records, key, width):
    """{window end step: mean of key over the train records in (end - width, end]}."""
    out = {}
    for r in records:
        if r["kind"] == "train" and key in r:
            end = -(-r["step"] // width) * width
            out.setdefault(end, []).append(r[key])
    return {end: sum(v) / len(v) for end, v in sorted(out.items())}


def seconds_per_step(records):
    """Training time per step from the train lines' elapsed_s: the interval after the first line
    (start-up, first-call compilation) is left out, and so is any interval over 1.5x the median rate
    (one that held an evaluation or a checkpoint); the rest are pooled, so that elapsed_s's rounding
    to 0.1 s cancels out instead of quantising each interval. None with fewer than two intervals."""
    train = [(r["step"], r["elapsed_s"]) for r in records if r["kind"] == "train" and "elapsed_s" in r]
    spans = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(train[1:], train[2:]) if s1 > s0]
    if len(spans) < 2:
        return None
    typical = statistics.median(dt / ds for ds, dt in spans)
    kept = [(ds, dt) for ds, dt in spans if dt / ds <= 1.5 * typical]
    return sum(dt for _, dt in kept) / sum(ds for ds, _ in kept)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--window", type=int, default=100, help="steps per averaging window (default: %(default)s)")
    p.add_argument("--plot", help="write the curves to this PNG")
    args = p.parse_args(argv)
    runs = {os.path.basename(os.path.normpath(r)): read_metrics(r) for r in args.runs}
    names = list(runs)
    for key in ("loss", "acc"):
        table = {n: windows(recs, key, args.window) for n, recs in runs.items()}
        steps = sorted(set().union(*table.values()))
        print(f"\ntrain {key}, mean over {args.window}-step windows\n")
        print("| step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for s in steps:
            print(f"| {s} | " + " | ".join(f"{table[n][s]:.4f}" if s in table[n] else "-" for n in names) + " |")
    print("\nvalidation accuracy\n")
    valid = {n: {r["step"]: r["valid_acc"] for r in recs if r["kind"] == "valid"} for n, recs in runs.items()}
    print("| step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for s in sorted(set().union(*valid.values())):
        print(f"| {s} | " + " | ".join(f"{valid[n][s]:.4f}" if s in valid[n] else "-" for n in names) + " |")
    print("\nseconds per training step (evaluations and checkpoints left out)\n")
    print("| run | s/step |\n|---|---|")
    for n, recs in runs.items():
        rate = seconds_per_step(recs)
        print(f"| {n} | " + ("-" if rate is None else f"{rate:.3f}") + " |")
    if args.plot:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for n in names:
            for ax, key in zip(axes[:2], ("loss", "acc")):
                w = windows(runs[n], key, args.window)
                ax.plot(list(w), list(w.values()), label=n)
                ax.set_title(f"train {key} ({args.window}-step mean)")
            axes[2].plot(list(valid[n]), list(valid[n].values()), marker="o", label=n)
            axes[2].set_title("validation accuracy")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    run(main)
