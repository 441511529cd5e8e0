"""The GPU check: what a CPU cannot tell us, in one command of at most ~8 minutes on one GPU.

    python -m tools.gpu_check                          # on a CUDA machine; prints a report to paste
    python -m tools.gpu_check --device cpu --quick     # the same steps on a tiny model (the tests)

1. the machine: torch, the device, whether it has fast bf16, its memory;
2. the tests that need CUDA (skipped on a CPU): fast paths and metrics on CUDA tensors;
3. tools.bench for WRN-28-10 at K=20 and K=5, every fast path beside the fp32 loop
   (bf16 autocast where the device has native bf16, channels-last, CUDA graphs, torch.compile);
4. a training probe: train_jem.py --preset cifar10-paper on the fastest path for a few dozen steps,
   timed from its own metrics.jsonl: seconds per iteration, peak memory, and the projected time of
   the paper's 200 epochs (140,600 iterations of batch 64).

Each step runs under its own time limit and reports "timed out" rather than hold up the rest.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from cli import UsageError, has_fast_bf16, resolve_device, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_ITERS = 200 * (45_000 // 64)  # cifar10-paper: 45,000 training images (5,000 held out), 200 epochs
FIXTURES = os.path.join(REPO, "tests", "fixtures", "data")  # speed does not depend on the pixels


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model instead of WRN-28-10 and no test run: checks the script itself in seconds")
    p.add_argument("--probe-iters", type=int, default=60, help="training probe steps, >= 30 (default: %(default)s)")
    return p


def machine(device):
    lines = [f"torch {torch.__version__}, python {sys.version.split()[0]}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"{props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2 ** 30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append(f"CPU, {torch.get_num_threads()} threads")
    return lines


def run_step(title, cmd, timeout):
    """One step as a child process; its output goes into the report."""
    print(f"\n## {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout} s")
        return None
    out = proc.stdout.strip()
    print(out if out else proc.stderr.strip()[-2000:])
    print(f"({time.time() - t0:.0f} s, exit status {proc.returncode})", flush=True)
    return proc


def bench_steps(args, model_flags, sides, compile_side):
    """The bench at K=20 and K=5; torch.compile (minutes of compiling) apart, at K=20, so that a
    compile that overruns its limit costs only its own figure."""
    runs = [(20, sides, 120), (5, sides, 90)] + ([(20, [sides[0], compile_side], 120)] if compile_side else [])
    for k, names, limit in runs:
        rounds = ["--warmup", "1", "--iters", "2"] if args.quick else ["--warmup", "2", "--iters", "5"]
        cmd = [sys.executable, "-m", "tools.bench", "--device", args.device, "--sides", ",".join(names),
               *rounds, "--", *model_flags, "--n-steps", str(k)]
        # --quick is the CPU test's tiny model (~20 s a bench alone, most of it starting processes);
        # its limit only catches a hang, and a CI machine busy with other jobs took over 60 s
        run_step(f"bench, K={k}", cmd, timeout=180 if args.quick else limit)


def training_probe(args, device, flags):
    """train_jem.py itself on the fast path: s/iter between its 20th and last step (after compiling
    and graph capture), and the peak memory of the process (CUDA: max allocated)."""
    import train_jem
    print(f"\n## training probe\n$ python train_jem.py {' '.join(flags)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_flags = [*flags, "--data-root", FIXTURES, "--n-valid", "8", "--max-eval", "8",
                     "--max-iters", str(args.probe_iters), "--log-every", "10", "--eval-every", "100000",
                     "--ckpt-every", "100000", "--sample-every", "0", "--ckpt-root", tmp,
                     "--samples-root", tmp, "--run-name", "probe", "--device", args.device]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_jem.main(run_flags)
        with open(os.path.join(tmp, "probe", "metrics.jsonl")) as f:
            train = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    first = next(r for r in train if r["step"] >= 20)
    last = train[-1]
    s_per_iter = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    print(f"probe: {s_per_iter:.3f} s/iter (steps {first['step']}-{last['step']}), peak memory {peak:.1f} GiB; "
          f"the paper's 200 epochs ({PAPER_ITERS:,} iterations) would take {s_per_iter * PAPER_ITERS / 3600:.1f} h")
    return s_per_iter


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.probe_iters < 30:
        raise UsageError("--probe-iters must be >= 30: the probe times its steps from the 20th on")
    device = resolve_device(args.device)
    print("# GPU check\n" + "\n".join(machine(device)), flush=True)
    if args.quick:  # a tiny ResNet on MNIST: every step of the check, in seconds
        model_flags = ["--preset", "mnist-cpu", "--width", "4", "--batch-size", "16", "--buffer-size", "160"]
        probe = ["--preset", "mnist-cpu", "--width", "4", "--batch-size", "16", "--buffer-size", "160",
                 "--n-steps", "2", "--pretrain-epochs", "0", "--train-subset", "160"]
    else:
        model_flags = ["--preset", "cifar10-paper"]
        probe = ["--preset", "cifar10-paper", "--precision", "auto", "--channels-last"]
    # the fastest path bf16 only where the device runs it natively: emulated (a CPU without AVX-512
    # BF16, a GPU before Ampere) it is slower than fp32, 4x on the tests' model on an AVX2 CPU
    fast = "lean+bf16+cl" if has_fast_bf16(device) else "lean+cl"
    sides, compile_side = ["lean", fast], None
    if device.type == "cuda":
        sides.append(f"{fast}+graph")
        compile_side = f"{fast}+compile"
        probe += ["--cuda-graph"]
    if args.quick:
        print("\n## CUDA tests\nskipped (--quick)")
    else:
        run_step("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_fastpaths.py",
                                "tests/test_metrics.py"], timeout=90)
    bench_steps(args, model_flags, sides, compile_side)
    training_probe(args, device, probe)


if __name__ == "__main__":
    run(main)
