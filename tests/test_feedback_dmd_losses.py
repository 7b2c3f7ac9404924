"""Feedback and DMD losses in closed form (issue 5's unit layer)."""
import pytest
import torch

from hsd.losses.dmd import dmd_gradient, dmd_loss, fake_score_loss
from hsd.losses.feedback import reward_hinge


def test_hinge_is_zero_above_margin_and_linear_below():
    r = {"aes": torch.tensor([6.0, 7.0]), "ir": torch.tensor([2.5, 3.0])}
    assert reward_hinge(r, {"aes": 5.5, "ir": 2.0}) == 0
    r["ir"] = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = reward_hinge(r, {"aes": 5.5, "ir": 2.0}, {"ir": 1e-3})
    assert torch.isclose(loss, torch.tensor(1e-3 * 0.5))            # mean_b ReLU(2 - [1, 3]) = 0.5
    loss.backward()
    assert torch.allclose(r["ir"].grad, torch.tensor([-0.5e-3, 0.0]))  # only the sample below its margin pulls
    with pytest.raises(ValueError, match="no margin"):
        reward_hinge({"x": torch.ones(1)}, {})


def test_dmd_gradient_vanishes_when_scores_agree_and_moves_toward_real():
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    real = torch.randn(3, 4, 8, 8)
    assert dmd_gradient(x0.detach(), real, real).abs().max() == 0
    assert dmd_loss(x0, real, real) == 0
    fake = real + 0.5
    loss = dmd_loss(x0, real, fake)
    loss.backward()
    expected = dmd_gradient(x0.detach(), real, fake) / x0.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7)
    assert (x0.grad > 0).all()   # descent moves x0 by -grad: away from the fake prediction, toward the real one


def test_fake_score_loss_is_the_denoising_loss():
    eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.isclose(fake_score_loss(eps, noise), ((eps - noise) ** 2).mean())
