"""Time JEM training iterations against their floor, the bare network passes they must do.

    python -m tools.bench --sides naive,lean --iters 5 -- --preset mnist-cpu --n-steps 20
    python -m tools.bench --sides lean,lean+bf16,lean+cl --device cuda -- --preset cifar10-paper --depth 16 --widen 4

Everything after `--` is train_jem.py's own flags (preset, model, batch size, SGLD settings), so
the benchmark runs the configuration a training run would. A side is "naive" (the official JEM
code's loop, below), "lean" (train_jem.py's jem_loss, draw_samples, SGLDSampler and ReplayBuffer)
or "loop" (train_jem.py's whole step as its loop runs it: the augmented batch, the learning rate,
forward_backward, the guard's check and snapshot, the optimizer step), with optional fast paths
joined by "+": bf16, cl (channels-last), compile, graph (CUDA graphs).

Each side is measured on the same weights and the same synthetic batch (uniform images, random
labels: speed does not depend on the pixels), each in its own process, one after another, as it
would run alone: sides that shared one process slowed each other (WRN-16-4's fp32 side took 13.4
s/iter beside bf16 and channels-last sides, ~10 alone). The table gives medians over the timed rounds:
  iter      one training iteration: SGLD chains, the loss, backward, the loop's one host sync
            (loss and gradient norm), optimizer step
  sgld      the chain draws alone (buffer draw, K steps, write-back), as in the iteration
  cls       an iteration with the energy terms off (a plain classifier step)
  energy    iter - sgld - cls: the energy terms' share of the loss passes
  floor     the bare passes: K x (forward + input-backward) per chain set, plus forward + backward
            of the loss batch, with the side's model (precision, layout) and nothing else
  overhead  iter / floor; 1.00 means the iteration costs exactly its network passes
  peak      peak memory of one iteration: RSS (CPU, whole process) or max allocated (CUDA)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

import train_jem
from checkpoint import model_kwargs
from cli import resolve_device
from data import JEMData, dataset_info
from distributed import Ranks
from models import build_model
from sgld import ReplayBuffer, SGLDSampler, prepare_model

FAST_PATHS = ("bf16", "cl", "compile", "graph")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="naive,lean",
                   help="comma-separated sides: naive, lean, loop, or lean+FAST+... / loop+FAST+... with FAST in "
                        f"{', '.join(FAST_PATHS)}; ratios are against the first (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compiling, graph capture, caches) (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds; the table gives medians (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write every timing and the config to PATH ('-' for stdout)")
    return p


# ---- the naive reference: the official JEM code's sampler and step (Grathwohl et al., train_wrn_ebm.py)

class NaiveJEM:
    """The paper's algorithm as the official code writes it: replay buffer in host memory, chains
    moved to the device and back every step, `x.data +=` updates with a fresh noise tensor per
    step, autograd.grad(..., retain_graph=True), separate forward passes for the data energy, the
    samples and the classifier, and `.item()` on the loss. Same objective as train_jem.jem_loss."""

    def __init__(self, model, optimizer, cfg, shape, n_classes):
        self.model, self.optimizer, self.cfg, self.n_classes = model, optimizer, cfg, n_classes
        self.buffer = torch.rand(cfg.buffer_size, *shape) * 2 - 1  # CPU, as in the official code

    def sample_q(self, n, y=None):
        cfg, device = self.cfg, next(self.model.parameters()).device
        per_class = len(self.buffer) if y is None else len(self.buffer) // self.n_classes
        inds = torch.randint(0, per_class, (n,))
        if y is not None:
            inds = y.cpu() * per_class + inds
        random_samples = torch.rand(n, *self.buffer.shape[1:]) * 2 - 1
        choose_random = (torch.rand(n) < cfg.reinit_freq).float()[:, None, None, None]
        samples = choose_random * random_samples + (1 - choose_random) * self.buffer[inds]
        x_k = samples.to(device).requires_grad_(True)
        self.model.eval()
        for _ in range(cfg.n_steps):
            f_prime = torch.autograd.grad(-self.model.energy(x_k, y).sum(), [x_k], retain_graph=True)[0]
            x_k.data += cfg.step_size * f_prime + cfg.noise_std * torch.randn_like(x_k)
            if cfg.clamp:
                x_k.data.clamp_(-1, 1)
        self.model.train()
        final = x_k.detach()
        self.buffer[inds] = final.cpu()
        return final

    def sgld(self, x_lab, y_lab):
        if self.cfg.px_weight > 0:
            self.sample_q(len(x_lab))
        if self.cfg.pxy_weight > 0:
            self.sample_q(len(x_lab), y_lab)

    def iteration(self, x_lab, y_lab, energy_on=True):
        cfg, model = self.cfg, self.model
        loss = cfg.pyx_weight * F.cross_entropy(model(x_lab), y_lab)
        if energy_on and cfg.px_weight > 0:
            x_q = self.sample_q(len(x_lab))
            loss = loss + cfg.px_weight * (model.energy(x_lab).mean() - model.energy(x_q).mean())
        if energy_on and cfg.pxy_weight > 0:
            x_q = self.sample_q(len(x_lab), y_lab)
            loss = loss + cfg.pxy_weight * (model.energy(x_lab, y_lab).mean() - model.energy(x_q, y_lab).mean())
        if abs(loss.item()) > 1e8:
            raise RuntimeError("diverged")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class LeanJEM:
    """train_jem.py's own code: jem_loss (draw_samples, SGLDSampler, device-side ReplayBuffer) and
    the loop's backward, gradient norm, one host sync and optimizer step."""

    def __init__(self, model, optimizer, cfg, shape, n_classes, fast, device):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.buffer = ReplayBuffer(cfg.buffer_size, shape, n_classes=n_classes if cfg.pxy_weight > 0 else None,
                                   reinit_freq=cfg.reinit_freq, device=device)
        self.sampler = SGLDSampler(cfg.n_steps, cfg.step_size, cfg.noise_std, cfg.clamp, cfg.grad_clip,
                                   channels_last="cl" in fast, compile="inductor" if "compile" in fast else None,
                                   cuda_graph="graph" in fast)

    def sgld(self, x_lab, y_lab):
        if self.cfg.px_weight > 0:
            train_jem.draw_samples(self.model, self.sampler, self.buffer, len(x_lab))
        if self.cfg.pxy_weight > 0:
            train_jem.draw_samples(self.model, self.sampler, self.buffer, len(x_lab), y_lab)

    def iteration(self, x_lab, y_lab, energy_on=True):
        loss, metrics, _ = train_jem.jem_loss(self.model, self.sampler, self.buffer, self.cfg,
                                              train_jem.Batch(x_lab, y_lab), energy_on)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        torch.stack([loss.detach(), metrics["max_logit"], grad_norm]).tolist()  # the loop's one sync
        self.optimizer.step()


class TrainStep(LeanJEM):
    """train_jem.py's step end to end, built by its own build_run on synthetic uint8 images: what
    the training loop does per step beyond jem_loss (augmentation, the learning rate, the guard)."""

    def __init__(self, cfg, info, fast, device):
        cfg = argparse.Namespace(**{**vars(cfg), "precision": "bf16" if "bf16" in fast else "fp32", "channels_last": "cl" in fast,
                                    "compile": "compile" in fast, "cuda_graph": "graph" in fast})
        g = torch.Generator().manual_seed(0)
        n = 4 * cfg.batch_size
        x = torch.randint(256, (n, info.channels, info.image_size, info.image_size), generator=g,
                          dtype=torch.uint8).to(device)
        y = torch.randint(info.n_classes, (n,), generator=g).to(device)
        self.data = JEMData(info, list(range(info.n_classes)), x, y, torch.arange(n, device=device),
                            x[:0], y[:0], x[:0], y[:0])
        torch.manual_seed(cfg.seed)  # the same weights as every other side
        state, self.net, self.sampler = train_jem.build_run(cfg, info, self.data, train_jem.build_guard(cfg),
                                                            Ranks(), device, run_dir=None)
        self.state, self.model, self.buffer, self.cfg, self.info = state, state.model, state.buffer, cfg, info
        self.state.model.train()
        self.signals = types.SimpleNamespace(signum=None)  # forward_backward asks if Ctrl-C came: never

    def iteration(self, x_lab=None, y_lab=None, energy_on=True):
        cfg, state, iters_per_epoch = self.cfg, self.state, len(self.data.train_x) // self.cfg.batch_size
        batch = train_jem.training_batch(self.data, cfg, self.info, state.step, iters_per_epoch, self.buffer.device)
        for group in state.optimizer.param_groups:
            group["lr"] = train_jem.learning_rate(cfg, state.step, iters_per_epoch)
        metrics, samples, health, stop = train_jem.forward_backward(self.net, self.sampler, state, cfg, batch,
                                                                    energy_on, self.signals)
        state.guard.check(health)
        state.guard.maybe_snapshot(state.step, state.training_state, checkpointed=state.step % cfg.ckpt_every == 0)
        state.optimizer.step()
        state.step += 1


def floor_sgld(model, x, y, n_steps):
    """K bare input-gradient passes: what any SGLD implementation must compute."""
    x = x.detach().clone().requires_grad_(True)
    for _ in range(n_steps):
        torch.autograd.grad(model.energy(x, y).sum(), x)


def floor_loss(model, x):
    """Forward + backward to the parameters of the loss batch (data and sample chunks together)."""
    model(x).logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)


# ---- measuring ---------------------------------------------------------------------------------------

def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS (Linux)
            f.write("5")


def read_peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def parse_side(name, device):
    """'lean+bf16+cl' -> ('lean', ['bf16', 'cl']); one line and exit for a side that cannot run."""
    kind, *fast = name.split("+")
    if kind not in ("naive", "lean", "loop") or any(f not in FAST_PATHS for f in fast) or (kind == "naive" and fast):
        raise SystemExit(f"error: unknown side '{name}': naive, lean, loop, or lean+FAST+... / loop+FAST+... "
                         f"with FAST in {', '.join(FAST_PATHS)}")
    if "graph" in fast and device.type != "cuda":
        raise SystemExit("error: the graph fast path needs --device cuda")
    return kind, fast


def make_side(name, cfg, info, device):
    kind, fast = parse_side(name, device)
    if kind == "loop":
        return TrainStep(cfg, info, fast, device)
    torch.manual_seed(cfg.seed)  # every side starts from the same weights
    model = build_model(**model_kwargs(vars(cfg), info)).to(device)
    model = prepare_model(model, "cl" in fast, "bf16" in fast, "inductor" if "compile" in fast else None)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shape = (info.channels, info.image_size, info.image_size)
    if kind == "naive":
        return NaiveJEM(model, optimizer, cfg, shape, info.n_classes)
    return LeanJEM(model, optimizer, cfg, shape, info.n_classes, fast, device)


def bench(args, cfg):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dataset_info(cfg.dataset)
    g = torch.Generator().manual_seed(0)
    n = cfg.batch_size
    x = (torch.rand(n, info.channels, info.image_size, info.image_size, generator=g) * 2 - 1).to(device)
    y = torch.randint(info.n_classes, (n,), generator=g).to(device)
    sets = [None] * (cfg.px_weight > 0) + [y] * (cfg.pxy_weight > 0)  # the chain sets an iteration draws
    if not sets:
        raise SystemExit("error: no energy term (--px-weight and --pxy-weight are 0): nothing to benchmark")
    names = args.sides.split(",")
    sides = {name: make_side(name, cfg, info, device) for name in names}
    loss_batch = torch.cat([x] * (1 + len(sets)))
    parts = {
        "iter": lambda s: s.iteration(x, y),
        "sgld": lambda s: s.sgld(x, y),
        "cls": lambda s: s.iteration(x, y, energy_on=False),
        "floor_sgld": lambda s: [floor_sgld(s.model, x, ys, cfg.n_steps) for ys in sets],
        "floor_loss": lambda s: floor_loss(s.model, loss_batch),
    }
    times = {name: {part: [] for part in parts} for name in names}
    for r in range(args.warmup + args.iters):
        for name, side in sides.items():  # interleaved: each round measures every side once
            for part, fn in parts.items():
                t = timed(lambda: fn(side), device)
                if r >= args.warmup:
                    times[name][part].append(t)
        print(f"round {r + 1}/{args.warmup + args.iters}" + (" (warm-up)" if r < args.warmup else ""),
              file=sys.stderr, flush=True)
    results = {}
    for name, side in sides.items():
        reset_peak(device)
        side.iteration(x, y)
        peak = read_peak_mib(device)
        med = {part: statistics.median(ts) for part, ts in times[name].items()}
        floor = med["floor_sgld"] + med["floor_loss"]
        results[name] = {
            "s_per_iter": med["iter"], "images_per_s": n / med["iter"], "sgld_s": med["sgld"],
            "cls_s": med["cls"], "energy_s": med["iter"] - med["sgld"] - med["cls"],
            "floor_s": floor, "floor_sgld_s": med["floor_sgld"], "floor_loss_s": med["floor_loss"],
            "overhead": med["iter"] / floor, "sgld_overhead": med["sgld"] / med["floor_sgld"],
            "peak_mib": peak, "speedup_vs_first": None, "times": times[name], "pid": os.getpid()}
    first = results[names[0]]["s_per_iter"]
    for r in results.values():
        r["speedup_vs_first"] = first / r["s_per_iter"]
    return results


def bench_alone(name, args, train_argv):
    """One side's results from a child process that runs only that side."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/side.json"
        cmd = [sys.executable, "-m", "tools.bench", "--sides", name, "--device", args.device,
               "--warmup", str(args.warmup), "--iters", str(args.iters), "--json", out,
               *(["--threads", str(args.threads)] if args.threads else []), "--", *train_argv]
        print(f"side {name}: its own process", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"error: side {name} failed (exit status {proc.returncode})")
        with open(out) as f:
            return json.load(f)["results"][name]


def table(results, cfg, args):
    model = (f"resnet-{cfg.width}" if cfg.arch == "resnet" else f"wrn-{cfg.depth}-{cfg.widen}")
    head = (f"{cfg.dataset} {model} batch {cfg.batch_size} K={cfg.n_steps} on {args.device}, "
            f"median of {args.iters} (after {args.warmup} warm-up)")
    cols = ["side", "s/iter", "img/s", "sgld s", "cls s", "energy s", "floor s", "overhead",
            "sgld ovh", "peak MiB", "speed-up"]
    rows = [[name, f"{r['s_per_iter']:.3f}", f"{r['images_per_s']:.1f}", f"{r['sgld_s']:.3f}",
             f"{r['cls_s']:.3f}", f"{r['energy_s']:.3f}", f"{r['floor_s']:.3f}", f"{r['overhead']:.2f}",
             f"{r['sgld_overhead']:.2f}", f"{r['peak_mib']:.0f}", f"{r['speedup_vs_first']:.2f}x"]
            for name, r in results.items()]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    cfg, _ = train_jem.resolve_config(argv[split + 1:])
    names = args.sides.split(",")
    for name in names:
        parse_side(name, resolve_device(args.device))
    if len(names) == 1:
        results = bench(args, cfg)
    else:  # each side alone in its own process
        results = {name: bench_alone(name, args, argv[split + 1:]) for name in names}
        for r in results.values():
            r["speedup_vs_first"] = results[names[0]]["s_per_iter"] / r["s_per_iter"]
    print(table(results, cfg, args))
    if args.json:
        record = {"bench": vars(args), "config": vars(cfg), "results": results,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        text = json.dumps(record, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
