"""Assertions shared by the tests: NaN-safe zero checks and the unbiasedness check of the
Russian-roulette estimators (used on the real estimators and on deliberately biased ones)."""

from __future__ import annotations

import math

import torch


def assert_none_or_zero(t: torch.Tensor | None, what: str = "") -> None:
    """``t`` is None or every entry is exactly 0. NaN-safe: ``not t.abs().max() > 0`` holds for a NaN
    (a NaN compares False), ``torch.equal`` with zeros does not."""
    if t is None:
        return
    assert torch.equal(t, torch.zeros_like(t)), f"{what}: expected None or zeros, got {t}"


def assert_unbiased(draws: torch.Tensor, truth: torch.Tensor | float, k: float = 5.0, slack: float = 1e-12,
                    what: str = "") -> None:
    """The mean of independent draws (first dimension) is within ``k`` standard errors of ``truth``,
    entry by entry.

    ``k = 5``: for a mean of a few hundred draws the central limit theorem makes the mean close to
    normal, and a correct estimator then fails with probability < 6e-7 per entry; the tests seed their
    draws, so each outcome is fixed, and the negative controls show the same bound rejects a biased
    estimator. ``slack`` covers float64 rounding where the draws do not vary (standard error 0).
    """
    draws = draws.detach().double()
    truth = torch.as_tensor(truth, dtype=torch.float64, device=draws.device)
    mean = draws.mean(0)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.isfinite(mean).all() and torch.isfinite(stderr).all(), f"{what}: non-finite draws"
    gap = (mean - truth).abs()
    ok = gap <= k * stderr + slack
    assert bool(ok.all()), (f"{what}: the mean of {draws.shape[0]} draws is {mean} and the truth {truth}: "
                            f"|gap| {gap} exceeds {k} standard errors {stderr}")


def drop_roulette_reweighting(monkeypatch) -> None:
    """A deliberately biased estimator for the negative controls: every Russian-roulette plan keeps the
    drawn terms but drops their 1 / P(N >= k) reweighting (the coefficient of term k is then the fraction
    of draws with N >= k, not 1), so the estimate is the series cut at random N, biased towards 0."""
    from resflow_cuda import estimators

    unbiased = estimators.roulette_plan

    def biased(samples, offset, survival):
        return unbiased(samples, offset, lambda j: 1.0)

    monkeypatch.setattr(estimators, "roulette_plan", biased)


def shift_roulette_survival(monkeypatch) -> None:
    """A deliberately biased estimator for the negative controls: every Russian-roulette plan reweights
    term k by 1 / P(N >= j + 1) instead of 1 / P(N >= j) (an off-by-one in the survival index), which
    overweights every drawn term past the exact ones."""
    from resflow_cuda import estimators

    unbiased = estimators.roulette_plan

    def biased(samples, offset, survival):
        return unbiased(samples, offset, lambda j: survival(j + 1))

    monkeypatch.setattr(estimators, "roulette_plan", biased)
