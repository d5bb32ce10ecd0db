"""Synthetic(alpha, beta) as the FedProx paper's generator draws it: alpha, beta as standard
deviations, the IID variant, the sample cap."""

from __future__ import annotations

import numpy as np

from fl_app.data.sources import SyntheticSource
from tests.conftest import data_settings

USERS = 200


def _source(**overrides) -> SyntheticSource:
    return SyntheticSource(data_settings(dataset="synthetic", synthetic_num_users=USERS,
                                       synthetic_max_samples=60, **overrides))


def test_beta_is_the_standard_deviation_of_the_users_feature_means():
    # A user's mean feature is B_k + N(0, 1/dim) + sampling noise with B_k ~ N(0, beta^2):
    # across 200 users the variance is ~9.02 for beta=3 (as the official generator's
    # np.random.normal(0, beta)), ~3 if beta were a variance. The sample variance of 200
    # such values has a relative sd of sqrt(2/199) = 0.10, so 6.5..12 fails with
    # probability < 1e-3 for the right semantics and never contains 3.
    source = _source(synthetic_beta=3.0)
    means = [source.partition(k, USERS).x.mean() for k in range(USERS)]
    assert 6.5 < np.var(means, ddof=1) < 12.0


def test_iid_users_share_one_distribution_and_one_model():
    source = _source(synthetic_iid=True, synthetic_alpha=5.0, synthetic_beta=5.0)
    means = np.array([source.partition(k, USERS).x.mean() for k in range(USERS)])
    assert np.abs(means).max() < 0.5  # every user's features are N(0, Sigma)
    # one shared linear model labels everyone: least squares on one-hot labels of all users
    # separates them far better than on the non-IID data
    def pooled_fit(src):
        parts = [src.partition(k, USERS) for k in range(USERS)]
        x = np.concatenate([p.x for p in parts])
        x = np.hstack([x, np.ones((len(x), 1))])
        y = np.concatenate([p.y for p in parts]).astype(int)
        coef, *_ = np.linalg.lstsq(x, np.eye(10)[y], rcond=None)
        return np.mean(np.argmax(x @ coef, axis=1) == y)
    assert pooled_fit(source) > pooled_fit(_source()) + 0.1


def test_sample_cap_is_a_key_and_zero_uncaps():
    capped = SyntheticSource(data_settings(dataset="synthetic", synthetic_num_users=30, seed=2))
    uncapped = SyntheticSource(data_settings(dataset="synthetic", synthetic_num_users=30, seed=2,
                                           synthetic_max_samples=0))
    sizes = [len(capped.partition(k, 30).x) for k in range(30)]
    big = [len(uncapped.partition(k, 30).x) for k in range(30)]
    assert max(sizes) <= 1000 < max(big)  # seed 2 draws a user of 3388
    assert sum(big) > sum(sizes)


def test_building_the_users_holds_no_more_than_their_float32_data_at_a_time():
    """Each user's float64 draw is freed before the next user's: the build's peak heap is
    the kept float32 data plus about one draw (a view of every draw kept to the end made it
    about 3x, every process of a 10,000-client run holding 60 KB a client instead of 25)."""
    import tracemalloc

    tracemalloc.start()
    source = _source()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data = sum(source.partition(k, USERS).x.nbytes for k in range(USERS))
    assert data <= kept  # the users' float32 features are what the source keeps
    assert peak < 1.5 * kept
