"""SGLD sampling from a JEM and the persistent replay buffer its chains start from.

    from sgld import ReplayBuffer, SGLDSampler
    buffer = ReplayBuffer(10_000, (3, 32, 32), n_classes=10, device="cuda")
    x0, idx = buffer.sample(64, y)            # y=None for unconditional chains
    x = SGLDSampler(n_steps=20)(model, x0, y)  # samples of p(x | y), or of p(x) when y is None
    buffer.update(idx, x)

Pure library code: no argparse, no global state. All randomness comes from the torch RNG of the
tensors' device, so a caller that saves torch's RNG state reproduces a run bit for bit.
"""
import contextlib
import functools

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
    With grad_clip=d each pixel's gradient is clipped to [-d, d] before the step; with clamp this
    is JEM++'s proximal step, which tolerates larger steps and so fewer of them.

    `schedule`, if given, is called once per chain run for its number of steps (see `step_ramp`)
    and overrides n_steps.

    The hot loop keeps the chains in fp32 on their device, writes each step in place into the
    same tensors (the noise too), asks autograd for the input gradient alone (no parameter
    gradient is computed, let alone stored) and never syncs with the host. Fast paths:
      channels_last  the chains in the channels-last layout (give it a channels-last model);
      compile        torch.compile backend name for the whole step, forward, input-backward and
                     update in one graph ("inductor"; tests use "aot_eager");
      cuda_graph     capture one step as a CUDA graph per input shape and replay it n_steps
                     times: no per-kernel launch cost. CUDA tensors only; the graph holds the
                     model's parameter tensors, so update them in place (optimizers do).
    bf16 is a property of the network's passes, not of the chains: see `prepare_model`.

    The sampler never changes the model's train/eval mode and leaves no gradients on its
    parameters; the caller decides the mode (JEM samples in eval mode).
    """

    def __init__(self, n_steps=20, step_size=1.0, noise_std=0.01, clamp=False, grad_clip=None,
                 schedule=None, channels_last=False, compile=None, cuda_graph=False):
        self.n_steps, self.step_size, self.noise_std = n_steps, step_size, noise_std
        self.clamp = clamp  # keep chains in the data range [-1, 1]
        self.grad_clip, self.schedule = grad_clip, schedule
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cuda_graph = cuda_graph
        self._step_fn, self._tracing = self._step, contextlib.nullcontext
        if compile:
            self._step_fn = torch.compile(self._step, backend=compile, dynamic=False)
            self._tracing = _trace_autograd_ops
        self._graphs = {}  # (shapes, model, mode) -> captured step and its static tensors

    def __call__(self, model, x, y=None, n_steps=None):
        """Run n_steps (default: the schedule's, else self.n_steps) on E(x) (y None) or E(x, y);
        returns a detached fp32 tensor."""
        if n_steps is None:
            n_steps = self.schedule() if self.schedule is not None else self.n_steps
        x = x.detach().to(torch.float32, memory_format=self.memory_format, copy=True)
        if n_steps == 0:
            return x
        with self._tracing():
            if self.cuda_graph and x.is_cuda:
                return self._run_graphed(model, x, y, n_steps)
            x.requires_grad_(True)
            noise = torch.empty_like(x)
            for _ in range(n_steps):
                self._step_fn(model, x, y, noise)
        return x.detach()

    def _step(self, model, x, y, noise):
        """One step, in place on the leaf x: its input gradient, then one fused update."""
        (grad,) = torch.autograd.grad(model.energy(x, y).sum(), x)
        with torch.no_grad():
            if self.grad_clip is not None:
                grad.clamp_(-self.grad_clip, self.grad_clip)
            x.sub_(grad, alpha=self.step_size).add_(noise.normal_(), alpha=self.noise_std)
            if self.clamp:
                x.clamp_(-1.0, 1.0)

    def _run_graphed(self, model, x, y, n_steps):
        # a graph bakes in everything it was captured with: the shapes, the model and its mode,
        # and the step's settings (the divergence ladder changes n_steps and clamp mid-run)
        key = (tuple(x.shape), x.stride(), x.device, None if y is None else tuple(y.shape),
               id(model), model.training, self.step_size, self.noise_std, self.clamp, self.grad_clip)
        if key not in self._graphs:
            static_x = x.clone().requires_grad_(True)
            static_y = None if y is None else y.clone()
            noise = torch.empty_like(x)
            # capture needs the lazy initialisations (cuDNN plans, compiled kernels) done first,
            # on a side stream, as torch.cuda.graph's documentation asks
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._step_fn(model, static_x, static_y, noise)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_fn(model, static_x, static_y, noise)
            self._graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = self._graphs[key]
        with torch.no_grad():
            static_x.copy_(x)
            if y is not None:
                static_y.copy_(y)
        for _ in range(n_steps):
            graph.replay()
        return static_x.detach().clone()  # the static tensor is overwritten by the next call


def _trace_autograd_ops():
    """Lets torch.compile put autograd.grad inside the step's graph instead of breaking the
    graph there (a dynamo setting of recent PyTorch; without it the step runs as several graphs)."""
    import torch._dynamo
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


def step_ramp(buffer, start, end, over):
    """A step-count schedule: start steps at first, growing linearly to end over `over` buffer
    updates. It counts the buffer's updates (kept in its state_dict), so a resumed run continues
    the ramp where it stopped. Early in training the model's energy is smooth and the chains are
    near their start, so short chains suffice; later the samples need the longer ones."""
    def n_steps():
        return round(start + (end - start) * min(1.0, buffer.updates / max(1, over)))
    return n_steps


def prepare_model(model, channels_last=False, bf16=False, compile=None):
    """The fast paths that act on the network itself, applied in place; the state_dict keys stay
    those of the plain model, so checkpoints do not depend on them.

    bf16: each forward pass runs under bf16 autocast and returns fp32 logits, so losses,
    energies and the SGLD chains (fp32 in SGLDSampler) keep full precision; only the network's
    arithmetic is bf16 (no loss scaling needed: bf16 has fp32's range). compile: a torch.compile
    backend for the model's passes (Module.compile, which keeps the state_dict keys)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if bf16:
        forward = model.forward
        device_type = next(model.parameters()).device.type

        @functools.wraps(forward)
        def bf16_forward(*args, **kwargs):
            # no cast cache: each weight is cast once per pass anyway, and a cache would hold
            # tensors across CUDA-graph captures
            with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False):
                return forward(*args, **kwargs).float()
        model.forward = bf16_forward
    if compile:
        model.compile(backend=compile, dynamic=False)
    return model


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

    With `gaussian_rank` r (and init_data), chains start and restart instead from per-class
    Gaussians fitted to the (transformed) init images, as JEM++'s informative initialisation: a
    blurry class mean plus its main modes of variation, already close to the data under the model,
    so that few SGLD steps reach good samples. The fitted Gaussians are kept in the state_dict.

    `updates` counts the calls of `update` (training's chain write-backs; also in the state_dict):
    step-count schedules read it (`step_ramp`).
    """

    def __init__(self, size, shape, n_classes=None, reinit_freq=0.05, device="cpu",
                 init_data=None, init_labels=None, init_transform=None, gaussian_rank=None):
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
        self.gaussians = None
        if gaussian_rank is not None:
            if init_data is None:
                raise ValueError("gaussian_rank needs init_data and init_labels to fit to")
            self.gaussians = fit_class_gaussians(self.init_data, self.init_labels, gaussian_rank,
                                                 self.init_transform)
        self.updates = 0
        self._undo = None  # (idx, old chains, update count) per update since begin(); None: not kept
        slot_class = None
        if n_classes:
            slot_class = torch.arange(size, device=self.device) // (size // n_classes)
        self.x = self._fresh(size, slot_class)

    def _index_init_data(self):
        """Sort the init images by class once, so a class-matched draw is one randint."""
        labels = self.init_labels.to(self.device)
        order = torch.argsort(labels, stable=True)
        self.init_data, labels = self.init_data.to(self.device)[order], labels[order]
        self.init_labels = labels
        counts = torch.bincount(labels, minlength=self.n_classes or 1)
        self._class_count = counts
        self._class_start = torch.cumsum(counts, 0) - counts

    def _fresh(self, n, y=None):
        """n new chain starts: uniform noise, Gaussian draws or random (class-matched) training images."""
        if self.gaussians is not None:
            if y is None:  # classes as often as in the data
                y = self.init_labels[torch.randint(len(self.init_labels), (n,), device=self.device)]
            return sample_class_gaussians(self.gaussians, y).view(n, *self.shape)
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
        if self._undo is not None:
            self._undo.append((idx, self.x[idx].clone(), self.updates))
        self.x[idx] = x.detach().to(self.device, memory_format=torch.contiguous_format)
        self.updates += 1

    def begin(self):
        """Keep what the next updates overwrite (a batch of chains each), until the next begin(),
        so that undo() can take them back: a training step stopped half way leaves no trace."""
        self._undo = []

    def undo(self):
        """Restore the chains and update count of the last begin(), newest update first."""
        for idx, old, updates in reversed(self._undo or []):
            self.x[idx], self.updates = old, updates
        self._undo = []

    def state_dict(self):
        """The chains, their class layout, the update count and the fitted Gaussians (if any);
        settings such as reinit_freq belong to the caller."""
        state = {"x": self.x, "n_classes": self.n_classes, "updates": self.updates}
        if self.gaussians is not None:
            state["gaussians"] = self.gaussians
        return state

    def load_state_dict(self, state):
        if tuple(state["x"].shape) != (self.size, *self.shape):
            raise ValueError(f"buffer of shape {tuple(state['x'].shape)} does not fit "
                             f"{(self.size, *self.shape)}")
        if state["n_classes"] != self.n_classes:
            raise ValueError("buffer was saved with a different class layout")
        self.x = state["x"].to(self.device)
        self.updates = int(state.get("updates", 0))  # absent in checkpoints from before the count
        # the stored fit, not a refit, so a resumed run is exact; a checkpoint without Gaussians,
        # or with a fit of another rank, keeps the one just made from the data
        stored = state.get("gaussians")
        if self.gaussians is not None and stored is not None and all(
                stored[k].shape == v.shape for k, v in self.gaussians.items()):
            self.gaussians = {k: v.to(self.device) for k, v in stored.items()}


def fit_class_gaussians(x_u8, labels, rank, transform=None, max_per_class=5000):
    """One Gaussian per class over flattened images: probabilistic PCA, covariance
    V diag(l - s^2) V^T + s^2 I with the top `rank` principal directions V, their variances l and
    the mean variance s^2 of the rest (Tipping & Bishop 1999). Rank = pixels is a full covariance
    (JEM++ fits full ones: 3072^2 floats per CIFAR class; rank 32 keeps ~85% of the variance in
    about 1% of the memory). x_u8: uint8 N x C x H x W; at most max_per_class images per class.
    Returns {"mean": K x D, "scale": K x D x r, "sigma": K}."""
    n_classes = int(labels.max()) + 1
    means, scales, sigmas = [], [], []
    for c in range(n_classes):
        xc = x_u8[labels == c][:max_per_class].float().div(127.5).sub(1.0)
        if transform is not None:
            xc = transform(xc)
        xc = xc.flatten(1)
        n, d = xc.shape
        mean = xc.mean(0)
        xc = xc - mean
        r = max(0, min(rank, n - 1, d))
        total = xc.square().sum() / n
        if r > 0:
            _, s, v = torch.svd_lowrank(xc, q=r, niter=4)
            var = s.square() / n
        else:
            v, var = xc.new_zeros(d, 0), xc.new_zeros(0)
        rest = ((total - var.sum()) / max(1, d - r)).clamp_min(1e-6)
        means.append(mean)
        scales.append(v * (var - rest).clamp_min(0).sqrt())
        sigmas.append(rest.sqrt())
    return {"mean": torch.stack(means), "scale": torch.stack(scales), "sigma": torch.stack(sigmas)}


def sample_class_gaussians(gaussians, y):
    """Draws from the Gaussians of classes y (a 1-D tensor), clamped to the data range: N x D."""
    scale = gaussians["scale"][y]
    z = torch.randn(len(y), scale.shape[2], 1, device=y.device)
    x = gaussians["mean"][y] + (scale @ z).squeeze(2)
    return x.add_(torch.randn_like(x) * gaussians["sigma"][y, None]).clamp_(-1.0, 1.0)


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
