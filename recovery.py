"""Unattended JEM training: notice a diverging step, roll back to a verified state, retry mitigated.

JEM's best-known failure is an energy blow-up a few epochs in. The official code stops when
|loss| > 1e8 (and never notices a NaN); its authors restarted runs by hand from the last checkpoint
with a new seed. `Guard` does that restart itself:

1. detect: one host sync per training step reads the loss, the largest |logit| (= |E(x, y)|, and
   |E(x)| within log K of it), the data/sample energy gap and the gradient norm; any non-finite
   value, or one past its threshold, or (optionally) a loss spike against a running mean, is a
   divergence. The check runs before `optimizer.step()`, so bad gradients are never applied.
2. roll back: every `snapshot_every` steps the state that the check has just verified (model,
   optimizer, replay buffer, step) is copied to host memory; a divergence restores it.
3. mitigate: draw a new seed derived from the attempt number (a recovered run stays
   reproducible) and climb one rung of a ladder of stability measures, cumulatively:
   reseed -> halve the lr -> restart part of the replay buffer -> raise the energy L2 penalty ->
   ... The mitigated settings live in the run's config, so checkpoints and `--resume` keep them.
4. record: a `recovery` line in metrics.jsonl, and a debug folder with the offending samples.

`inject` puts faults in on demand (a NaN into a weight, a learning-rate spike) to show all this.
"""
import json
import math
import os
import sys

import torch
from tqdm import tqdm

from data import save_grid
from distributed import rank_seed

RUNGS = ("reseed", "lr", "reinit", "l2", "steps", "clamp")
FAULTS = ("nan", "lr-spike")


def parse_faults(specs):
    """['120:nan', '300:lr-spike'] -> {120: 'nan', 300: 'lr-spike'}; ValueError names a bad one."""
    faults = {}
    for spec in specs or []:
        step, _, kind = spec.partition(":")
        if not step.isdigit() or kind not in FAULTS:
            raise ValueError(f"bad --inject-fault '{spec}': expected STEP:KIND with KIND one of {', '.join(FAULTS)}")
        faults[int(step)] = kind
    return faults


def parse_ladder(text):
    rungs = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rungs if r not in RUNGS]
    if bad or not rungs:
        raise ValueError(f"bad --recovery-ladder '{text}': rungs are {', '.join(RUNGS)}")
    return rungs


def host_copy(obj):
    """A deep copy with every tensor cloned to CPU memory (a snapshot must not alias live state)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def derived_seed(seed, attempt):
    """The seed of the attempt-th retry: new randomness, still a pure function of the run's seed."""
    return seed + 1_000_003 * attempt


class Guard:
    """Divergence detection, snapshots, rollback with mitigation, fault injection, event log."""

    def __init__(self, max_recoveries=8, ladder="reseed,lr,reinit,l2,lr,steps", snapshot_every=200,
                 max_loss=1e8, max_energy=1e4, max_gap=1e4, spike_factor=0.0, faults=None):
        self.max_recoveries, self.ladder = max_recoveries, parse_ladder(ladder)
        self.snapshot_every = snapshot_every
        self.max_loss, self.max_energy, self.max_gap = max_loss, max_energy, max_gap
        self.spike_factor = spike_factor
        self.faults = parse_faults(faults)
        self.snapshot = None
        # what a checkpoint must carry for an exact resume
        self.attempt, self.events, self.faults_done = 0, [], []
        self.loss_mean, self.loss_var, self.loss_n = 0.0, 0.0, 0

    # ---- detection ----------------------------------------------------------------------------

    def health_stats(self, loss, metrics, grad_norm):
        """Every checked quantity in one tensor, so reading them costs one host sync."""
        zero = loss.new_zeros(())
        return torch.stack([loss.detach(), metrics["max_logit"], metrics.get("gap", zero), grad_norm])

    def check(self, stats):
        """stats (4 floats, from health_stats) -> None if healthy, else (trigger, values)."""
        loss, max_logit, gap, grad_norm = stats
        values = {"loss": loss, "max_abs_logit": max_logit, "gap": gap, "grad_norm": grad_norm}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            return f"non-finite {', '.join(bad)}", values
        if abs(loss) > self.max_loss:
            return f"|loss| > {self.max_loss:g}", values
        if max_logit > self.max_energy:
            return f"|energy| > {self.max_energy:g}", values
        if abs(gap) > self.max_gap:
            return f"|energy gap| > {self.max_gap:g}", values
        if self.spike_factor > 0 and self.loss_n >= 100:
            if loss > self.loss_mean + self.spike_factor * math.sqrt(self.loss_var) + 1e-3:
                return f"loss spike (> mean + {self.spike_factor:g} std)", values
        # running loss statistics (EMA over ~100 steps) from healthy steps only
        self.loss_n += 1
        rate = max(0.01, 1.0 / self.loss_n)
        delta = loss - self.loss_mean
        self.loss_mean += rate * delta
        self.loss_var = (1 - rate) * (self.loss_var + rate * delta * delta)
        return None

    # ---- snapshots, faults, rollback ----------------------------------------------------------

    def maybe_snapshot(self, step, state_fn, checkpointed=False):
        """Keep a host copy of the just-verified state every snapshot_every steps, at the first
        verified step (so a rollback target always exists), and when the state is the one last
        written to disk (so the snapshot is never older than a good last.pt)."""
        if self.snapshot is None or step % self.snapshot_every == 0 or checkpointed:
            self.snapshot = host_copy(state_fn())

    def inject(self, step, model, optimizer):
        """Apply the fault scheduled at this step, once: a rollback past it does not re-fire it."""
        kind = self.faults.get(step)
        if kind is None or step in self.faults_done:
            return None
        self.faults_done.append(step)
        if kind == "nan":
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        elif kind == "lr-spike":  # one huge update: Adam moves every weight by ~lr
            for group in optimizer.param_groups:
                group["lr"] *= 1e4
        return kind

    def can_retry(self):
        return self.snapshot is not None and self.attempt < self.max_recoveries

    def next_rung(self):
        """The mitigation of the next attempt: the ladder's rungs in order, then its last again."""
        return self.ladder[min(self.attempt, len(self.ladder) - 1)]

    def record(self, step, trigger, values, actions, run_dir, samples=None):
        """The event: a dict for metrics.jsonl, and a debug folder with samples and values."""
        event = {"step": step, "kind": "recovery", "attempt": self.attempt, "trigger": trigger,
                 "values": values, "rollback_to": self.snapshot["step"] if self.snapshot else None,
                 "actions": actions}
        self.events.append(event)
        if run_dir is None:  # ranks other than 0 keep the event but write nothing
            return event
        folder = os.path.join(run_dir, "recovery", f"step_{step:07d}_attempt_{self.attempt}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "event.json"), "w") as f:
            json.dump(event, f, indent=2)
        if samples is not None:
            x = samples.detach().float().cpu()
            x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
            save_grid(x, os.path.join(folder, "samples.png"), nrow=8)
            torch.save({"samples": samples.detach().cpu()}, os.path.join(folder, "samples.pt"))
        return event

    def summary(self, finished):
        """Divergences seen and recovered (all of them if the run finished), and what was done."""
        # every rolled-back divergence was overcome if the run finished; a run that gives up
        # does so at one more divergence that has no event of its own
        return {"kind": "recovery_summary", "divergences": len(self.events) + (0 if finished else 1),
                "recovered": len(self.events),
                "triggers": [e["trigger"] for e in self.events],
                "actions": [a for e in self.events for a in e["actions"][2:]]}

    def state_dict(self):
        return {"attempt": self.attempt, "events": self.events, "faults_done": self.faults_done,
                "loss_stats": [self.loss_mean, self.loss_var, self.loss_n]}

    def load_state_dict(self, state):
        self.attempt, self.events = state["attempt"], state["events"]
        self.faults_done = state["faults_done"]
        self.loss_mean, self.loss_var, self.loss_n = state["loss_stats"]


def mitigate(rung, cfg, sampler, buffer):
    """Apply one ladder rung to the live run (cfg is the run's config, saved with checkpoints).
    Returns a short description of what changed."""
    if rung == "reseed":
        return "reseed"
    if rung == "lr":
        cfg.lr *= 0.5
        return f"lr -> {cfg.lr:g}"
    if rung == "reinit":  # restart a quarter of the chains, which may hold the runaway samples
        n = buffer.size // 4
        y = None
        if buffer.n_classes:
            y = torch.randint(buffer.n_classes, (n,), device=buffer.device)
        x, idx = buffer.sample(n, y, reinit_freq=1.0)
        buffer.update(idx, x)
        return f"restarted {n} buffer chains"
    if rung == "l2":
        cfg.l2_energy = max(0.1, 2 * cfg.l2_energy)
        return f"l2_energy -> {cfg.l2_energy:g}"
    if rung == "steps":
        cfg.n_steps = sampler.n_steps = int(math.ceil(cfg.n_steps * 1.5))
        return f"n_steps -> {cfg.n_steps}"
    if rung == "clamp":
        cfg.clamp = sampler.clamp = True
        return "clamp chains to [-1, 1]"
    raise ValueError(rung)


def roll_back(state, sampler, trigger, values, samples, log):
    """A step diverged (on some rank; all ranks agree): restore the state (run_state.RunState) to
    the guard's last verified snapshot, reseed, climb one rung of the mitigation ladder and write
    last.pt. When no recovery is left, write the last verified state and stop with an error."""
    guard, cfg, ranks = state.guard, state.cfg, state.ranks
    failed_step, last_path = state.step, os.path.join(state.run_dir, "last.pt")
    if not guard.can_retry():
        log({"step": failed_step, "kind": "diverged", "trigger": trigger, "values": values})
        log({"step": failed_step, **guard.summary(finished=False)})
        where = "no verified state yet"
        if guard.snapshot is not None:
            state.restore(guard.snapshot)
            state.save("last.pt")
            where = f"{last_path} holds the last verified state (step {state.step})"
        raise SystemExit(f"error: step {failed_step} diverged ({trigger}) after {guard.attempt} of "
                         f"{cfg.max_recoveries} recoveries; {where}: resume it with --resume, "
                         "perhaps with a lower --lr or --l2-energy 0.1")
    rung = guard.next_rung()
    guard.attempt += 1
    state.restore(guard.snapshot)
    seed = derived_seed(cfg.seed, guard.attempt)
    torch.manual_seed(rank_seed(seed, ranks.rank))
    action = mitigate(rung, cfg, sampler, state.buffer)
    log(guard.record(failed_step, trigger, values, [f"rollback to step {state.step}", f"seed {seed}", action],
                     state.run_dir if ranks.main else None, samples))
    if ranks.main:
        tqdm.write(f"step {failed_step} diverged ({trigger}): rolled back to step {state.step}, seed {seed}, "
                   f"{action} (recovery {guard.attempt} of {cfg.max_recoveries})", file=sys.stderr)
    state.save("last.pt")  # the verified state and its mitigation survive a crash
