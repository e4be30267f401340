"""Our DP-SGD (torch.func, class-aware clipping) against Opacus 1.6, the reference implementation.

With one clip bound (``negative_ratio=1``) our per-row gradients, clipped sums and
noiseless step must equal Opacus' ``GradSampleModule`` / ``DPOptimizer`` on the same
batch, and the noise we add must have std ``σ·C`` on the sum (``σ·C/B`` after the
division by the expected batch size ``B``).  Class-aware clipping must equal Opacus
run separately on the positive rows (bound C) and the negative rows (bound r·C).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from consortium.models import build_model
from consortium.privacy.dpsgd import clip_and_sum, dp_sgd_train, per_row_gradients
from consortium.privacy.mechanisms import DpSgdMechanism

N_FEATURES = 12
ROWS = 64
RTOL, ATOL = 1e-5, 1e-6

# Opacus' hooks warn that the input does not require grad; it need not (per-sample grads are of parameters).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 rows, about a third positive, with row scales spread so that some gradients are clipped and some not."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(ROWS, N_FEATURES)) * rng.uniform(0.2, 3.0, size=(ROWS, 1))
    y = (rng.random(ROWS) < 0.35).astype(np.float32)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)


@pytest.fixture
def model() -> nn.Module:
    return build_model("mlp", N_FEATURES, seed=3)


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: torch.Tensor) -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor
]:
    """Our per-row gradients, clipped sum and pre-clipping norms (model in eval mode, as dp_sgd_train runs it)."""
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = per_row_gradients(model)(params, x, y)
    summed, norms = clip_and_sum(grads, bound)
    return grads, summed, norms


def opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip: float, expected_batch: float) -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]
]:
    """Opacus' per-sample gradients, clipped sum and final gradient (σ = 0) on a copy of ``model``."""
    copied = copy.deepcopy(model)
    gsm = GradSampleModule(copied, batch_first=True, loss_reduction="mean")
    # Opacus records per-sample gradients only for modules in training mode; dropout off as in ours.
    gsm.train()
    for module in gsm.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=int(expected_batch),
        loss_reduction="mean",
    )
    optimizer.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(gsm(x).reshape(-1), y, reduction="mean")
    loss.backward()
    named = dict(copied.named_parameters())
    per_sample = {k: p.grad_sample.detach().clone() for k, p in named.items()}  # type: ignore[union-attr]
    assert optimizer.pre_step()  # clip and accumulate, add (zero) noise, divide by expected_batch
    summed = {k: p.summed_grad.detach().clone() for k, p in named.items()}  # type: ignore[attr-defined]
    final = {k: p.grad.detach().clone() for k, p in named.items()}  # type: ignore[union-attr]
    return per_sample, summed, final


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def median_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    _, _, norms = ours(model, x, y, torch.ones(len(y)))
    return float(norms.median())


def test_per_row_gradients_and_clipped_sum_equal_opacus(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    clip = median_norm(model, x, y)  # about half the rows are clipped
    grads, summed, norms = ours(model, x, y, torch.full((ROWS,), clip))
    per_sample, opacus_summed, _ = opacus(model, x, y, clip=clip, expected_batch=ROWS)
    assert 10 < int((norms > clip).sum()) < ROWS - 10
    assert_close(grads, per_sample)
    assert_close(summed, opacus_summed)
    # Not trivially equal: the clipped sum differs from the unclipped one.
    unclipped = {k: g.sum(0) for k, g in grads.items()}
    assert any(not torch.allclose(unclipped[k], summed[k], rtol=1e-3) for k in summed)


def test_class_aware_clipping_is_opacus_per_class(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    clip, ratio = median_norm(model, x, y), 0.3
    bound = torch.where(y > 0.5, torch.tensor(clip), torch.tensor(clip * ratio))
    _, summed, _ = ours(model, x, y, bound)
    pos, neg = y > 0.5, y <= 0.5
    _, pos_sum, _ = opacus(model, x[pos], y[pos], clip=clip, expected_batch=int(pos.sum()))
    _, neg_sum, _ = opacus(model, x[neg], y[neg], clip=clip * ratio, expected_batch=int(neg.sum()))
    assert_close(summed, {k: pos_sum[k] + neg_sum[k] for k in summed})
    # And dp_sgd_train uses that bound: its noiseless step is the per-class Opacus sum over B.
    update = _one_sgd_step(model, x, y, sigma=1e-9, clip=clip, seed=0, negative_ratio=ratio)
    assert_close(update, {k: (pos_sum[k] + neg_sum[k]) / ROWS for k in summed})


def _one_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float, clip: float,
                  seed: int, negative_ratio: float = 1.0) -> dict[str, torch.Tensor]:
    """``before - after`` of one dp_sgd_train step: every row sampled (q = 1), SGD with lr 1."""
    trained = copy.deepcopy(model)
    before = {k: p.detach().clone() for k, p in trained.named_parameters()}
    mechanism = DpSgdMechanism(noise_multiplier=sigma, clip_norm=clip, sampling_rate=1.0, steps_per_round=1)
    result = dp_sgd_train(trained, x.numpy(), y.numpy(), mechanism=mechanism, lr=1.0, negative_ratio=negative_ratio,
                          optimizer="sgd", seed=seed)
    assert result.steps == 1 and result.mean_batch == ROWS
    return {k: before[k] - p.detach() for k, p in trained.named_parameters()}


def test_noiseless_step_equals_opacus_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    clip = median_norm(model, x, y)
    # σ must be > 0 for a DpSgdMechanism; 1e-9 adds noise far below float tolerance.
    update = _one_sgd_step(model, x, y, sigma=1e-9, clip=clip, seed=0)
    _, _, opacus_grad = opacus(model, x, y, clip=clip, expected_batch=ROWS)
    assert_close(update, opacus_grad)


def test_noise_std_is_sigma_clip_over_expected_batch(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    clip, sigma = 0.5 * median_norm(model, x, y), 1.3
    _, _, opacus_grad = opacus(model, x, y, clip=clip, expected_batch=ROWS)
    update = _one_sgd_step(model, x, y, sigma=sigma, clip=clip, seed=11)
    noise = torch.cat([(update[k] - opacus_grad[k]).reshape(-1) for k in update])
    expected_std = sigma * clip / ROWS
    n = noise.numel()
    assert n > 2_000  # enough draws: the std estimate's relative standard error is 1/sqrt(2n) < 1.6 %
    assert abs(float(noise.std()) / expected_std - 1) < 0.05, (float(noise.std()), expected_std)
    assert abs(float(noise.mean())) < 4 * expected_std / n**0.5
    # Fixed seed, same noise; another seed, other noise.
    again = _one_sgd_step(model, x, y, sigma=sigma, clip=clip, seed=11)
    other = _one_sgd_step(model, x, y, sigma=sigma, clip=clip, seed=12)
    assert all(torch.equal(update[k], again[k]) for k in update)
    assert not all(torch.allclose(update[k], other[k]) for k in update)
