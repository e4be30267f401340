"""Tests for consortium.models.losses: imbalance-aware losses on logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from consortium.errors import ConfigError
from consortium.models import balanced_pos_weight, focal_loss, make_loss, reconstruction_loss

torch.set_num_threads(1)

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
TARGETS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.02, 49.0), (0.5, 1.0), (0.9, 1.0), (0.001, 100.0), (0.0, 100.0), (1.0, 1.0)],
)
def test_balanced_pos_weight(rate: float, expected: float) -> None:
    assert balanced_pos_weight(rate) == pytest.approx(expected)


def test_balanced_pos_weight_cap_and_validation() -> None:
    assert balanced_pos_weight(0.001, cap=10.0) == 10.0
    with pytest.raises(ConfigError, match="'positive_rate' parameter of balanced_pos_weight"):
        balanced_pos_weight(1.5)
    with pytest.raises(ConfigError, match="'positive_rate'"):
        balanced_pos_weight(math.nan)
    with pytest.raises(ConfigError, match="'cap'"):
        balanced_pos_weight(0.1, cap=0.5)


def test_weighted_bce_counts_positives_pos_weight_times() -> None:
    loss = make_loss("weighted_bce", pos_weight=4.0)(LOGITS, TARGETS)
    per_row = F.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none")
    expected = (per_row * torch.where(TARGETS == 1, 4.0, 1.0)).mean()
    torch.testing.assert_close(loss, expected)


def test_plain_bce_and_weight_one_agree() -> None:
    plain = make_loss("bce", pos_weight=None)(LOGITS, TARGETS)
    weighted = make_loss("weighted_bce", pos_weight=1.0)(LOGITS, TARGETS)
    torch.testing.assert_close(plain, weighted)


def test_focal_loss_matches_the_formula_by_hand() -> None:
    p = torch.sigmoid(LOGITS)
    p_t = torch.where(TARGETS == 1, p, 1 - p)
    alpha_t = torch.where(TARGETS == 1, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    got = make_loss("focal", pos_weight=None, focal_gamma=2.0, focal_alpha=0.25)(LOGITS, TARGETS)
    torch.testing.assert_close(got, expected)


def test_focal_with_gamma_zero_is_bce_and_downweights_easy_rows() -> None:
    bce = F.binary_cross_entropy_with_logits(LOGITS, TARGETS)
    torch.testing.assert_close(focal_loss(LOGITS, TARGETS, gamma=0.0), bce)
    weighted = make_loss("weighted_bce", pos_weight=3.0)(LOGITS, TARGETS)
    torch.testing.assert_close(focal_loss(LOGITS, TARGETS, gamma=0.0, pos_weight=3.0), weighted)
    # An easy, confidently correct row loses far more weight than a hard one.
    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])
    one = torch.tensor([1.0])
    ratio_easy = focal_loss(easy, one) / F.binary_cross_entropy_with_logits(easy, one)
    ratio_hard = focal_loss(hard, one) / F.binary_cross_entropy_with_logits(hard, one)
    assert ratio_easy < 0.01 < 0.5 < ratio_hard


def test_reconstruction_loss_is_mse() -> None:
    x = torch.zeros(2, 3)
    r = torch.ones(2, 3) * 2.0
    assert float(reconstruction_loss(r, x)) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "hinge", "pos_weight": None}, "name"),
        ({"name": "weighted_bce", "pos_weight": None}, "pos_weight"),
        ({"name": "weighted_bce", "pos_weight": -1.0}, "pos_weight"),
        ({"name": "bce", "pos_weight": 2.0}, "pos_weight"),
        ({"name": "focal", "pos_weight": None, "focal_gamma": -1.0}, "focal_gamma"),
        ({"name": "focal", "pos_weight": None, "focal_alpha": 1.5}, "focal_alpha"),
        ({"name": "focal", "pos_weight": 2.0, "focal_alpha": 0.25}, "focal_alpha"),
        ({"name": "bce", "pos_weight": None, "focal_alpha": 0.25}, "focal_alpha"),
    ],
)
def test_make_loss_rejects_bad_options(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}' parameter of make_loss"):
        make_loss(**kwargs)
