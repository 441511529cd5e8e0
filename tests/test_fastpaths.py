"""The sampler's fast paths and few-step options: same samples as the plain sampler (up to bf16
rounding), no parameter gradients, no mode change, no host sync; the buffer's Gaussian chain
starts and step-count schedule, including their checkpoint state. CPU; CUDA graphs need a GPU."""
import contextlib

import pytest
import torch

import train_jem
from checkpoint import load_checkpoint, save_checkpoint
from conftest import tiny_run_args
from models import build_model
from sgld import ReplayBuffer, SGLDSampler, fit_class_gaussians, prepare_model, step_ramp

VARIANTS = {  # name -> (prepare_model kwargs, SGLDSampler kwargs, relative tolerance against plain)
    "channels_last": (dict(channels_last=True), dict(channels_last=True), 1e-3),
    "bf16": (dict(bf16=True), {}, 0.1),
    # aot_eager traces the whole step (forward, input-backward, update) as torch.compile does,
    # without inductor's minutes of C++ compiling on a small CPU; inductor runs in bench.py
    "compile": (dict(compile="aot_eager"), dict(compile="aot_eager"), 1e-3),
    "all": (dict(channels_last=True, bf16=True, compile="aot_eager"),
            dict(channels_last=True, compile="aot_eager"), 0.1),
}


def tiny_model(**fast):
    torch.manual_seed(0)
    return prepare_model(build_model("resnet", 10, 1, width=4), **fast)


@contextlib.contextmanager
def no_host_reads():
    """Fail on every way a tensor's value reaches Python: on a GPU each would be a sync."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read inside the SGLD loop")
    names = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_paths_match_plain_sampler(name):
    model_kw, sampler_kw, tol = VARIANTS[name]
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    y = torch.arange(6)
    # noise 0: the chains are then a deterministic function of the model, comparable across paths;
    # a large step so that they move far (~0.5) and the comparison of their moves means something
    plain = SGLDSampler(n_steps=4, step_size=10.0, noise_std=0.0)(tiny_model().eval(), x0, y)
    model = tiny_model(**model_kw)
    sampler = SGLDSampler(n_steps=4, step_size=10.0, noise_std=0.0, **sampler_kw)
    for mode in (False, True):
        model.train(mode)
        with no_host_reads():
            x = sampler(model, x0, y)
        assert model.training is mode
        assert all(p.grad is None for p in model.parameters())
        assert x.dtype == torch.float32 and not x.requires_grad and x.shape == x0.shape
        assert (x - plain).norm() < tol * (plain - x0).norm(), name


def test_bf16_model_gives_fp32_logits_and_keeps_state_dict_keys():
    plain, fast = tiny_model(), tiny_model(bf16=True, channels_last=True)
    x = torch.rand(4, 1, 28, 28)
    logits = fast(x)
    assert logits.dtype == torch.float32
    assert (logits - plain(x)).abs().max() < 0.05
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_sampler_with_noise_keeps_the_plain_chain_statistics():
    """With noise the paths draw different numbers; the chains' spread must still agree."""
    x0 = torch.zeros(64, 1, 28, 28)
    spreads = []
    for fast in ({}, dict(channels_last=True)):
        torch.manual_seed(1)
        x = SGLDSampler(n_steps=3, noise_std=0.1, **fast)(tiny_model(channels_last=bool(fast)).eval(), x0)
        spreads.append((x - x.mean(0)).std().item())
    assert abs(spreads[0] / spreads[1] - 1) < 0.05


def test_grad_clip_bounds_each_step():
    model = tiny_model().eval()
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    for step in (1.0, 100.0):  # a huge step: the clip alone bounds the move
        x = SGLDSampler(n_steps=1, step_size=step, noise_std=0.0, grad_clip=1e-3)(model, x0)
        assert (x - x0).abs().max() <= step * 1e-3 * (1 + 1e-5)


def test_step_ramp_grows_with_buffer_updates_and_drives_the_sampler():
    buffer = ReplayBuffer(20, (1, 28, 28))
    ramp = step_ramp(buffer, 2, 10, over=4)
    counts = []
    for _ in range(6):
        counts.append(ramp())
        buffer.updates += 1
    assert counts == [2, 4, 6, 8, 10, 10]

    calls = []
    model = tiny_model().eval()
    energy = model.energy
    model.energy = lambda x, y=None: calls.append(1) or energy(x, y)
    buffer.updates = 1
    SGLDSampler(n_steps=10, schedule=ramp)(model, torch.zeros(2, 1, 28, 28))
    assert len(calls) == 4
    assert len(SGLDSampler(n_steps=10, schedule=ramp)(model, torch.zeros(2, 1, 28, 28), n_steps=0)) == 2


def two_class_data():
    """Class 0: dark images with a bright left half; class 1: the mirror image. Exact means known."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (200, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(200) % 2
    x[y == 0, :, :, :4] += 200
    x[y == 1, :, :, 4:] += 200
    return x, y


def test_gaussian_chain_starts_follow_the_class_data():
    torch.manual_seed(0)
    x, y = two_class_data()
    buffer = ReplayBuffer(400, (1, 8, 8), n_classes=2, reinit_freq=1.0, init_data=x, init_labels=y,
                          gaussian_rank=3)
    for c in (0, 1):
        data_mean = x[y == c].float().div(127.5).sub(1).mean(0)
        chains = buffer.x[c * 200:(c + 1) * 200]
        assert (chains.mean(0) - data_mean).abs().mean() < 0.03
        assert chains.abs().max() <= 1
    starts, _ = buffer.sample(100, torch.ones(100, dtype=torch.long))  # restarts are class-matched
    assert starts[..., 4:].mean() > starts[..., :4].mean() + 1


def test_gaussian_fit_recovers_a_known_covariance():
    torch.manual_seed(0)
    d, n = 16, 20000
    direction = torch.zeros(d)
    direction[0] = 1.0
    z = torch.randn(n, 1) * 0.3 * direction + torch.randn(n, d) * 0.05  # var 0.09 + 0.0025 along e0
    x_u8 = ((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).view(n, 1, 4, 4)
    g = fit_class_gaussians(x_u8, torch.zeros(n, dtype=torch.long), rank=1)
    assert g["scale"].shape == (1, d, 1)
    assert abs(g["scale"][0, :, 0].norm().item() - (0.09 ** 0.5)) < 0.02
    assert abs(g["sigma"][0].item() - 0.05) < 0.01


def test_buffer_state_keeps_gaussians_and_update_count_and_reads_old_checkpoints():
    x, y = two_class_data()
    make = lambda: ReplayBuffer(40, (1, 8, 8), n_classes=2, init_data=x, init_labels=y, gaussian_rank=2)
    torch.manual_seed(0)
    a = make()
    a.update(torch.arange(3), torch.zeros(3, 1, 8, 8))
    torch.manual_seed(1)  # another fit: loading must replace it with the stored one
    b = make()
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and torch.equal(b.x, a.x)
    assert all(torch.equal(b.gaussians[k], a.gaussians[k]) for k in a.gaussians)
    old = {"x": a.x.clone(), "n_classes": 2}  # a checkpoint from before both existed
    fitted = {k: v.clone() for k, v in b.gaussians.items()}
    b.load_state_dict(old)
    assert b.updates == 0 and all(torch.equal(b.gaussians[k], fitted[k]) for k in fitted)
    plain = ReplayBuffer(40, (1, 8, 8), n_classes=2)  # sample.py's buffer: ignores the Gaussians
    plain.load_state_dict(a.state_dict())
    assert plain.gaussians is None and torch.equal(plain.x, a.x)


def test_training_with_few_step_and_speed_flags(data_root, tmp_path):
    """A short real run with every CPU-capable flag: trains, checkpoints the Gaussians and the
    update count, and stores the flags in the config."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "fast", "--max-iters", 4, "--gaussian-init", 4,
                                 "--grad-clip", 0.01, "--clamp", "--steps-from", 1, "--steps-ramp", 2,
                                 "--precision", "bf16", "--channels-last"))
    ckpt = load_checkpoint(str(tmp_path / "ck" / "fast" / "last.pt"))
    assert ckpt["buffer"]["updates"] == 8  # 4 steps x (p(x) + p(x, y) chains)
    assert ckpt["buffer"]["gaussians"]["scale"].shape == (10, 784, 4)
    cfg = ckpt["config"]
    assert (cfg["gaussian_init"], cfg["grad_clip"], cfg["steps_from"], cfg["precision"]) == (4, 0.01, 1, "bf16")


def test_fast_paths_measured_equal_are_on_by_default_and_the_rest_off():
    """bf16 where native and channels-last are the defaults (docs/speed.md: measured equal to fp32
    in accuracy, ECE and samples over 3 seeds); compile and CUDA graphs stay opt-in."""
    cfg = train_jem.build_parser().parse_args([])
    assert cfg.precision == "auto" and cfg.channels_last and not (cfg.compile or cfg.cuda_graph)
    assert cfg.gaussian_init == 0 and cfg.grad_clip is None and cfg.steps_from is None
    assert not train_jem.build_parser().parse_args(["--no-channels-last"]).channels_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampler_matches_eager_and_never_syncs():
    torch.manual_seed(0)
    model = build_model("resnet", 10, 1, width=8).cuda().eval()
    x0 = torch.rand(16, 1, 28, 28, device="cuda") * 2 - 1
    y = torch.arange(16, device="cuda") % 10
    eager = SGLDSampler(n_steps=5, noise_std=0.0, clamp=True)(model, x0, y)
    graphed = SGLDSampler(n_steps=5, noise_std=0.0, clamp=True, cuda_graph=True)
    graphed(model, x0, y)  # capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = graphed(model, x0, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (x - eager).abs().max() < 1e-4
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # the graph follows in-place weight updates, as an optimizer makes them
        for p in model.parameters():
            p.mul_(1.1)
    eager = SGLDSampler(n_steps=5, noise_std=0.0, clamp=True)(model, x0, y)
    assert (graphed(model, x0, y) - eager).abs().max() < 1e-4


def test_precision_auto_follows_the_hardware_and_old_bf16_checkpoints_resume_as_bf16(data_root, tmp_path, monkeypatch):
    from cli import has_fast_bf16, resolve_precision
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if has_fast_bf16(cpu) else "fp32")
    import cli
    monkeypatch.setattr(cli, "has_fast_bf16", lambda device: False)
    assert resolve_precision("auto", cpu) == "fp32"
    # a checkpoint written before --precision holds bf16: True; its resume keeps bf16
    train_jem.main(tiny_run_args(data_root, tmp_path, "old", "--max-iters", 2, "--precision", "bf16"))
    path = tmp_path / "ck" / "old" / "last.pt"
    ckpt = load_checkpoint(str(path))
    config = {k: v for k, v in ckpt["config"].items() if k != "precision"}
    save_checkpoint({**ckpt, "config": {**config, "bf16": True}}, str(path))
    cfg, _ = train_jem.resolve_config(["--run-name", "old", "--resume", "--ckpt-root", str(tmp_path / "ck")])
    assert cfg.precision == "bf16" and not hasattr(cfg, "bf16")


def test_the_mnist_preset_is_the_measured_recipe():
    """The `mnist` preset is, flag for flag, the command its 3-seed figures were measured with
    (docs/training.md): the recipe study's base command plus row S of round 3, with round 4's
    longer schedule and lighter energy penalty (row ZU), round 6's ten SGLD steps and the learned
    temperature (the mt runs)."""
    measured = ["--preset", "mnist-cpu", "--pretrain-epochs", "0", "--buffer-init", "noise", "--epochs", "8",
                "--decay-epochs", "6", "--lr", "1e-3", "--warmup-iters", "200", "--n-steps", "10", "--step-size", "4",
                "--sample-every", "500", "--pxy-weight", "0.3", "--l2-energy", "0.03", "--buffer-size", "1000",
                "--reinit-freq", "0.002", "--learn-temperature", "--run-name", "r"]
    preset, _ = train_jem.resolve_config(["--preset", "mnist", "--run-name", "r"])
    flags, _ = train_jem.resolve_config(measured)
    assert {**vars(preset), "preset": None} == {**vars(flags), "preset": None}
    baseline, _ = train_jem.resolve_config(["--preset", "mnist", "--no-learn-temperature", "--run-name", "r"])
    assert preset.learn_temperature and not baseline.learn_temperature  # the baselines were measured without T


def test_the_fashion_mnist_preset_is_the_measured_recipe():
    """`fashion-mnist` is the command its figures were measured with (docs/training.md, round 2):
    `--preset mnist --dataset fashion_mnist --step-size 2 --learn-temperature`, nothing else changed."""
    preset, _ = train_jem.resolve_config(["--preset", "fashion-mnist", "--run-name", "r"])
    measured = ["--preset", "mnist", "--dataset", "fashion_mnist", "--step-size", "2", "--learn-temperature",
                "--run-name", "r"]
    flags, _ = train_jem.resolve_config(measured)
    assert preset.dataset == "fashion_mnist" and preset.step_size == 2.0 and preset.learn_temperature
    assert {**vars(preset), "preset": None} == {**vars(flags), "preset": None}


def test_the_cifar10_presets_carry_the_measured_cpu_recipe():
    """`cifar10-cpu` is the command its figures were measured with (docs/training.md, CIFAR-10 round
    1, run c2-s1, with T refit as tools.refit_temperature refit it: the same, tests/test_train.py);
    `cifar10-gpu` takes its objective and sampler onto the paper's network, optimiser
    and schedule, and differs from `cifar10-paper` in nothing else."""
    preset, _ = train_jem.resolve_config(["--preset", "cifar10-cpu", "--run-name", "r"])
    measured = ["--preset", "mnist", "--dataset", "cifar10", "--epochs", "10", "--decay-epochs", "8",
                "--step-size", "1", "--pxy-weight", "0.1", "--refit-temperature", "--run-name", "r"]
    flags, _ = train_jem.resolve_config(measured)
    assert {**vars(preset), "preset": None} == {**vars(flags), "preset": None}
    gpu, _ = train_jem.resolve_config(["--preset", "cifar10-gpu", "--run-name", "r"])
    paper, _ = train_jem.resolve_config(["--preset", "cifar10-paper", "--run-name", "r"])
    sampler_and_objective = {"n_steps", "step_size", "noise_std", "clamp", "buffer_size", "reinit_freq",
                             "buffer_init", "l2_energy", "sigma", "pyx_weight", "px_weight", "pxy_weight",
                             "learn_temperature"}
    for key, value in vars(gpu).items():
        expected = vars(preset)[key] if key in sampler_and_objective else vars(paper)[key]
        assert key == "preset" or value == expected, key
    assert (gpu.arch, gpu.depth, gpu.widen, gpu.lr, gpu.epochs) == ("wrn", 28, 10, 1e-4, 200)
    # 200 epochs of WRN-28-10 may get nearly every training image right: no refit until measured
    assert preset.refit_temperature and not gpu.refit_temperature
