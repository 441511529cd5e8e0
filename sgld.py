"""SGLD sampling from a JEM and the persistent replay buffer its chains start from.

    from sgld import ReplayBuffer, SGLDSampler
    buffer = ReplayBuffer(10_000, (3, 32, 32), n_classes=10, device="cuda")
    x0, idx = buffer.sample(64, y)            # y=None for unconditional chains
    x = SGLDSampler(n_steps=20)(model, x0, y)  # samples of p(x | y), or of p(x) when y is None
    buffer.update(idx, x)

Pure library code: no argparse, no global state. All randomness comes from the torch RNG of the
tensors' device, so a caller that saves torch's RNG state reproduces a run bit for bit.
"""
import torch
import torch.nn.functional as F


class SGLDSampler:
    """Stochastic-gradient Langevin dynamics on the model's energy, w.r.t. the input only.

    x <- x - step_size * dE/dx + noise_std * N(0, I)      (JEM: step_size 1, noise_std 0.01)

    True Langevin dynamics would use noise_std = sqrt(2 * step_size); JEM's smaller noise samples
    exp(-E / T) at the temperature T = noise_std**2 / (2 * step_size), a trick that makes short
    chains from a persistent buffer produce sharp images (paper, section 5).

    With clamp=True the chains stay in [-1, 1]: otherwise they can drift to pixel values no
    image has, where the model raises the energy at no cost to the data and training diverges.

    The sampler never changes the model's train/eval mode and leaves no gradients on its
    parameters; the caller decides the mode (JEM samples in eval mode). No host sync happens
    inside the step loop.
    """

    def __init__(self, n_steps=20, step_size=1.0, noise_std=0.01, clamp=False):
        self.n_steps, self.step_size, self.noise_std = n_steps, step_size, noise_std
        self.clamp = clamp  # keep chains in the data range [-1, 1]

    def __call__(self, model, x, y=None, n_steps=None):
        """Run n_steps (default self.n_steps) on E(x) (y None) or E(x, y); returns a detached tensor."""
        x = x.detach().clone().requires_grad_(True)
        for _ in range(self.n_steps if n_steps is None else n_steps):
            # autograd.grad w.r.t. x alone: no parameter .grad is written or even computed
            (grad,) = torch.autograd.grad(model.energy(x, y).sum(), x)
            with torch.no_grad():
                x.add_(grad, alpha=-self.step_size)
                x.add_(torch.randn_like(x), alpha=self.noise_std)
                if self.clamp:
                    x.clamp_(-1.0, 1.0)
        return x.detach()


class ReplayBuffer:
    """A persistent store of SGLD chain states (Du & Mordatch 2019; JEM section 4).

    With `n_classes` set, slot i belongs to class i // (size // n_classes), so class-conditional
    chains for class y start from and return to that class's slice. Each `sample` re-initialises a
    fraction `reinit_freq` of the drawn chains from uniform noise in [-1, 1] or, if `init_data` is
    given (uint8 N x C x H x W), from random training images (of the right class for conditional
    draws) passed through `init_transform`. Give it the data batches' augmentation: chains that
    start from centred digits while the data are shifted teach the model that centred means fake,
    and clean test digits are then misclassified (MNIST validation accuracy fell to 62%; 84% when
    the same model saw shifted digits).
    """

    def __init__(self, size, shape, n_classes=None, reinit_freq=0.05, device="cpu",
                 init_data=None, init_labels=None, init_transform=None):
        if n_classes and size % n_classes:
            raise ValueError(f"buffer size {size} must be a multiple of n_classes {n_classes}")
        self.size, self.shape, self.n_classes = size, tuple(shape), n_classes
        self.reinit_freq, self.device = reinit_freq, torch.device(device)
        self.init_data, self.init_labels = init_data, init_labels
        self.init_transform = init_transform
        if init_data is not None:
            if init_labels is None:
                raise ValueError("init_data needs init_labels")
            self._index_init_data()
        slot_class = None
        if n_classes:
            slot_class = torch.arange(size, device=self.device) // (size // n_classes)
        self.x = self._fresh(size, slot_class)

    def _index_init_data(self):
        """Sort the init images by class once, so a class-matched draw is one randint."""
        labels = self.init_labels.to(self.device)
        order = torch.argsort(labels, stable=True)
        self.init_data, labels = self.init_data.to(self.device)[order], labels[order]
        counts = torch.bincount(labels, minlength=self.n_classes or 1)
        self._class_count = counts
        self._class_start = torch.cumsum(counts, 0) - counts

    def _fresh(self, n, y=None):
        """n new chain starts: uniform noise, or random (class-matched) training images."""
        if self.init_data is None:
            return torch.rand((n, *self.shape), device=self.device) * 2 - 1
        if y is None:
            idx = torch.randint(len(self.init_data), (n,), device=self.device)
        else:
            u = torch.rand(n, device=self.device)
            idx = self._class_start[y] + (u * self._class_count[y]).long()
        x = self.init_data[idx].float().div(127.5).sub(1.0)
        return x if self.init_transform is None else self.init_transform(x)

    def sample(self, n, y=None, reinit_freq=None):
        """Draw n chain starts (for classes y, if given) and their slot indices for `update`.

        Slots are drawn without replacement, so no two chains of a batch write to one slot (the
        outcome of such a write would be unspecified, and resuming would not be exact)."""
        if y is None:
            if n > self.size:
                raise ValueError(f"cannot draw {n} distinct chains from a buffer of {self.size}")
            idx = torch.randperm(self.size, device=self.device)[:n]
        else:
            if not self.n_classes:
                raise ValueError("class-conditional draws need a buffer built with n_classes")
            per_class = self.size // self.n_classes
            y = y.to(self.device)
            # the k-th request for class c takes the k-th slot of a random order of c's slice
            order = torch.rand(self.n_classes, per_class, device=self.device).argsort(dim=1)
            k = F.one_hot(y, self.n_classes).cumsum(0).gather(1, y[:, None]).squeeze(1) - 1
            idx = y * per_class + order[y, k]
        x = self.x[idx]
        freq = self.reinit_freq if reinit_freq is None else reinit_freq
        if freq > 0:
            reinit = torch.rand(n, device=self.device) < freq
            x = torch.where(reinit.view(-1, 1, 1, 1), self._fresh(n, None if y is None else y), x)
        return x, idx

    def update(self, idx, x):
        self.x[idx] = x.detach().to(self.device)

    def state_dict(self):
        """The chains and their class layout; settings such as reinit_freq belong to the caller."""
        return {"x": self.x, "n_classes": self.n_classes}

    def load_state_dict(self, state):
        if tuple(state["x"].shape) != (self.size, *self.shape):
            raise ValueError(f"buffer of shape {tuple(state['x'].shape)} does not fit "
                             f"{(self.size, *self.shape)}")
        if state["n_classes"] != self.n_classes:
            raise ValueError("buffer was saved with a different class layout")
        self.x = state["x"].to(self.device)


def class_conditional_samples(model, sampler, classes, shape, buffer=None, batch_size=100,
                              n_steps=None, device="cpu"):
    """SGLD on p(x | y) for each label in `classes` (a 1-D tensor), in batches.

    Chains start from the buffer (the class's slice if it has one, else any slot; no re-init) or,
    with buffer None, from uniform noise. The buffer is not modified.
    """
    out = []
    for y in classes.to(device).split(batch_size):
        if buffer is None:
            x0 = torch.rand((len(y), *shape), device=device) * 2 - 1
        else:
            x0, _ = buffer.sample(len(y), y if buffer.n_classes else None, reinit_freq=0)
        out.append(sampler(model, x0.to(device), y, n_steps=n_steps))
    return torch.cat(out)
