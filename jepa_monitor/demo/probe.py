"""Linear probe on frozen features: closed-form ridge regression onto one-hot labels, in float64."""

from __future__ import annotations

from typing import Tuple

import torch


def fit_ridge(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, alpha: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, scale, weight, bias) of a ridge classifier on standardised features.

    Features are standardised with the training statistics; the intercept is not penalised (the
    targets are centred, as scikit-learn's ``Ridge(fit_intercept=True)`` does).
    """
    x = features.to(torch.float64)
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-12)
    xs = (x - mean) / scale
    y = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
    y_mean = y.mean(0)
    gram = xs.T @ xs + alpha * torch.eye(xs.shape[1], dtype=torch.float64, device=xs.device)
    weight = torch.linalg.solve(gram, xs.T @ (y - y_mean))
    return mean, scale, weight, y_mean


def ridge_predict(features: torch.Tensor, mean, scale, weight, bias) -> torch.Tensor:
    """Class scores (N, C) of fitted ridge parameters."""
    return ((features.to(torch.float64) - mean) / scale) @ weight + bias


def probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int = 10,
    alpha: float = 1.0,
) -> float:
    """Accuracy of a ridge linear probe fitted on the training features, on the test features."""
    params = fit_ridge(train_features, train_labels, num_classes, alpha=alpha)
    pred = ridge_predict(test_features, *params).argmax(1)
    return float((pred.cpu() == test_labels.cpu()).to(torch.float64).mean())
