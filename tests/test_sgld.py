"""The sampler against distributions with known answers, and the replay buffer's bookkeeping."""
import torch
import torch.nn as nn

from models import build_model
from sgld import ReplayBuffer, SGLDSampler, class_conditional_samples


class GaussianEnergy(nn.Module):
    """E(x) = |x - mu|^2 / (2 var): exp(-E) is N(mu, var). With y, the mean is mu_y."""

    def __init__(self, mu, var):
        super().__init__()
        self.mu, self.var = nn.Parameter(mu), var

    def energy(self, x, y=None):
        mu = self.mu[0 if y is None else y]  # (D,) or (N, D)
        return ((x.flatten(1) - mu) ** 2).sum(1) / (2 * self.var)


def test_langevin_reaches_gaussian_mean_and_variance():
    torch.manual_seed(0)
    var, a = 0.25, 0.005
    model = GaussianEnergy(torch.tensor([[1.5, -0.5]]), var)
    sampler = SGLDSampler(n_steps=2000, step_size=a, noise_std=(2 * a) ** 0.5)  # true Langevin
    x = sampler(model, torch.zeros(4000, 2, 1, 1))
    # the discretised chain's stationary variance is var / (1 - a / (2 var)) (Ornstein-Uhlenbeck)
    expected_var = var / (1 - a / (2 * var))
    assert torch.allclose(x.mean(0).flatten(), torch.tensor([1.5, -0.5]), atol=0.03)
    assert torch.allclose(x.var(0).flatten(), torch.tensor([expected_var] * 2), rtol=0.08)


def test_jem_noise_is_a_low_temperature():
    """JEM's noise_std << sqrt(2 step) samples exp(-E / T) with T = noise_std^2 / (2 step)."""
    torch.manual_seed(0)
    var, a, s = 1.0, 0.02, 0.05
    model = GaussianEnergy(torch.tensor([[0.0]]), var)
    x = SGLDSampler(n_steps=1500, step_size=a, noise_std=s)(model, torch.randn(4000, 1, 1, 1))
    t = s ** 2 / (2 * a)
    expected_var = t * var / (1 - a / (2 * var))
    assert abs(x.var().item() / expected_var - 1) < 0.08


def test_conditional_sampling_uses_the_class_energy():
    torch.manual_seed(0)
    mu = torch.tensor([[-2.0], [3.0]])
    model = GaussianEnergy(mu, 0.1)
    y = torch.tensor([0, 1]).repeat(500)
    x = SGLDSampler(400, 0.01, (2 * 0.01) ** 0.5)(model, torch.zeros(1000, 1, 1, 1), y)
    assert abs(x[y == 0].mean().item() + 2) < 0.05
    assert abs(x[y == 1].mean().item() - 3) < 0.05


def test_sampler_leaves_no_parameter_grads_and_keeps_mode():
    model = build_model("resnet", 10, 1, width=4, dropout=0.1)
    for mode in (True, False):
        model.train(mode)
        x = SGLDSampler(n_steps=3)(model, torch.rand(5, 1, 28, 28))
        assert model.training is mode
        assert all(p.grad is None for p in model.parameters())
        assert not x.requires_grad and x.shape == (5, 1, 28, 28)


def test_sampler_lowers_the_energy():
    torch.manual_seed(0)
    model = build_model("resnet", 10, 3, width=4).eval()
    x0 = torch.rand(16, 3, 32, 32) * 2 - 1
    x = SGLDSampler(n_steps=20, step_size=1.0, noise_std=0.0)(model, x0)
    assert (model.energy(x) < model.energy(x0)).float().mean() > 0.9


def test_buffer_class_slices_and_reinit_fraction():
    torch.manual_seed(0)
    buf = ReplayBuffer(1000, (1, 2, 2), n_classes=10, reinit_freq=0.0)
    buf.x = torch.arange(1000.0).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    y = torch.randint(10, (500,))
    x, idx = buf.sample(500, y)
    assert torch.equal(idx // 100, y)                      # slot i belongs to class i // 100
    assert torch.equal(x[:, 0, 0, 0], idx.float())
    assert len(set(idx.tolist())) == 500                    # no slot twice in one batch
    buf.reinit_freq = 0.3
    draws = [buf.sample(500) for _ in range(40)]
    x, idx = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    reinit = x[:, 0, 0, 0] != idx.float()                   # uniform noise never hits the slot value
    assert abs(reinit.float().mean().item() - 0.3) < 0.02
    assert x[reinit].abs().max() <= 1


def test_buffer_data_reinit_is_class_matched():
    torch.manual_seed(0)
    data = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1)
    labels = torch.arange(30) % 3
    buf = ReplayBuffer(30, (1, 1, 1), n_classes=3, reinit_freq=1.0, init_data=data, init_labels=labels)
    y = torch.arange(3).repeat(10)[torch.randperm(30)]    # a full slice per class, shuffled
    x, _ = buf.sample(30, y)
    pixel = ((x.flatten() + 1) * 127.5).round().long()
    assert torch.equal(pixel % 3, y)


def test_buffer_state_dict_round_trip_and_layout_check():
    buf = ReplayBuffer(20, (1, 4, 4), n_classes=2)
    other = ReplayBuffer(20, (1, 4, 4), n_classes=2)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.x, buf.x)
    wrong = ReplayBuffer(20, (1, 4, 4), n_classes=None)
    try:
        wrong.load_state_dict(buf.state_dict())
    except ValueError:
        pass
    else:
        raise AssertionError("a class-sliced buffer loaded into an unconditional one")


def test_class_conditional_samples_from_noise_and_buffer():
    torch.manual_seed(0)
    model = GaussianEnergy(torch.tensor([[-1.0], [1.0]]), 0.05)
    sampler = SGLDSampler(300, 0.005, 0.1)
    y = torch.tensor([0] * 50 + [1] * 50)
    x = class_conditional_samples(model, sampler, y, (1, 1, 1), batch_size=30)
    assert x.shape == (100, 1, 1, 1)
    assert x[:50].mean() < -0.9 and x[50:].mean() > 0.9
    buf = ReplayBuffer(200, (1, 1, 1), n_classes=2)
    before = buf.x.clone()
    class_conditional_samples(model, sampler, y, (1, 1, 1), buffer=buf, batch_size=30)
    assert torch.equal(buf.x, before)


def test_buffer_data_reinit_applies_the_transform():
    data = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    buf = ReplayBuffer(10, (1, 2, 2), reinit_freq=1.0, init_data=data, init_labels=torch.zeros(10).long(),
                       init_transform=lambda x: x + 0.25)
    assert torch.allclose(buf.x, torch.full_like(buf.x, -0.75))      # the initial fill too
    x, _ = buf.sample(5)
    assert torch.allclose(x, torch.full_like(x, -0.75))


def test_buffer_undo_takes_back_the_updates_since_begin():
    buffer = ReplayBuffer(40, (1, 4, 4), n_classes=4)
    buffer.update(*reversed(buffer.sample(8)))  # an update before begin() stays
    before, count = buffer.x.clone(), buffer.updates
    buffer.begin()
    for y in (None, torch.tensor([0, 1, 1, 3])):
        x0, idx = buffer.sample(4, y)
        buffer.update(idx, x0 + 1)
    assert not torch.equal(buffer.x, before) and buffer.updates == count + 2
    buffer.undo()
    assert torch.equal(buffer.x, before) and buffer.updates == count
