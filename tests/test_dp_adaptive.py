"""Adaptive clipping (Andrew et al., 2021) tracks the target quantile of the update norms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tests.dp_rounds import client_manager, dp_strategy, play_round, zeros

SIGMA = 0.5  # update norms are log-normal: log ||Δ|| ~ N(0, SIGMA²)


def _run(target: float, noise: float, client_side: bool, rounds: int = 120):
    """Clients send random-direction updates whose norms are log-normal; return the clip
    norm per round and whether each round's updates were under it."""
    rng = np.random.default_rng(11)
    manager = client_manager(200)
    strategy = dp_strategy(adaptive=True, fraction_fit=0.5, clipping_norm=0.1,
                           noise_multiplier=noise, target_quantile=target, clip_norm_lr=0.2,
                           client_side=client_side, noise_seed=3)
    base, clip_norms, under = zeros(), [], []

    def client(proxy, ins):
        norm = float(np.exp(rng.normal(0.0, SIGMA)))
        raw = [rng.normal(size=a.shape) for a in base]
        sent_norm, metrics = norm, {}
        if client_side:  # an honest client clips and reports it (as KerasClient does)
            sent_norm = min(norm, ins.config["clipping_norm"])
            metrics["norm_bit"] = norm > ins.config["clipping_norm"]
        scale = sent_norm / np.sqrt(sum(np.sum(r ** 2) for r in raw))
        under.append(norm <= strategy.clip_norm)
        return [(b + r * scale).astype(np.float32) for b, r in zip(base, raw)], 1, metrics

    for r in range(1, rounds + 1):
        clip_norms.append(strategy.clip_norm)
        new, metrics, _ = play_round(strategy, manager, r, base, client)
        base = new
    return np.array(clip_norms), np.array(under).reshape(rounds, -1)


@pytest.mark.parametrize("target, noise, client_side", [
    (0.5, 0.0, False), (0.8, 0.0, False), (0.5, 1.0, False), (0.3, 1.0, True)])
def test_clip_norm_converges_to_the_target_quantile(target, noise, client_side):
    clip_norms, under = _run(target, noise, client_side)
    quantile = float(np.exp(SIGMA * stats.norm.ppf(target)))  # true quantile of the norms
    settled = clip_norms[-40:]
    assert clip_norms[0] == 0.1  # started far below (every update clipped at first)
    assert np.median(settled) == pytest.approx(quantile, rel=0.1)
    assert under[-40:].mean() == pytest.approx(target, abs=0.05)


def test_clipped_count_gets_gaussian_noise_of_the_configured_std():
    """Every update is under C, so the noise-free count is m; chi-square test of the noise
    on the count over 300 rounds (false-failure rate 1e-6, two-sided)."""
    m, count_stddev = 10, 2.0
    manager = client_manager(m)
    strategy = dp_strategy(adaptive=True, noise_multiplier=1.0, clipped_count_stddev=count_stddev,
                           clipping_norm=1.0, noise_seed=5)
    base = zeros()
    counts = []
    for r in range(1, 301):
        _, metrics, _ = play_round(strategy, manager, r, base, lambda p, i: (base, 1, {}))
        counts.append(metrics["dp_unclipped_fraction"] * m)
    noise = np.array(counts) - m
    statistic = np.sum(noise ** 2) / count_stddev ** 2
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], noise.size)
    assert low < statistic < high
