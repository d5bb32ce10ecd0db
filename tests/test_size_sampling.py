"""`client-sampling='size'`: clients drawn in proportion to the training-set size they report,
as the q-FFL paper samples devices; refused where a client's size must stay private."""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.common import Code, GetPropertiesRes, Status

from fl_app.app.local_client import client_for
from fl_app.app.server_app import server_components
from fl_app.data.sources import load_partition
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.server.client_manager import SeededClientManager
from fl_app.wire import CLIENT_KEY, NUM_EXAMPLES
from tests.conftest import make_config
from tests.flower_objects import IdleProxy

SIZES = [900, *[10] * 9]  # one big client among ten: 900 of 990 examples


class SizedProxy(IdleProxy):
    """A client that tells its key and, when it has one, its training-set size."""

    def __init__(self, cid: str, size: int | None) -> None:
        super().__init__(cid)
        self.size = size

    def get_properties(self, ins, timeout, group_id):
        properties = {CLIENT_KEY: f"key-{self.cid}"}
        if self.size is not None:
            properties[NUM_EXAMPLES] = self.size
        return GetPropertiesRes(Status(Code.OK, ""), properties)


def _draws(by_size: bool, seed: int = 0, rounds: int = 500, sizes=SIZES) -> Counter:
    """How often each client is drawn alone, over `rounds` draws of one of them."""
    manager = SeededClientManager(seed, by_size=by_size)
    for i, size in enumerate(sizes):
        manager.register(SizedProxy(f"c{i}", size))
    return Counter(proxy.cid for _ in range(rounds) for proxy in manager.sample(1))


def test_a_client_is_drawn_in_proportion_to_its_size():
    assert _draws(by_size=True)["c0"] / 500 == pytest.approx(900 / 990, abs=0.04)
    assert _draws(by_size=False)["c0"] / 500 == pytest.approx(1 / 10, abs=0.04)  # the control


def test_size_sampling_is_reproducible_with_a_seed_and_without_replacement():
    def sampled(seed: int) -> list[str]:
        manager = SeededClientManager(seed, by_size=True)
        for i, size in enumerate(SIZES):
            manager.register(SizedProxy(f"c{i}", size))
        return [proxy.cid for proxy in manager.sample(5)]

    assert sampled(3) == sampled(3)
    assert len(set(sampled(3))) == 5
    assert len({tuple(sampled(s)) for s in range(6)}) > 1


def test_a_client_that_reports_no_size_counts_as_one_example(caplog):
    draws = _draws(by_size=True, sizes=[None, 99])
    assert draws["c0"] / 500 == pytest.approx(1 / 100, abs=0.02)
    assert "client c0 reports no usable training-set size" in caplog.text


def _share(draws: Counter, cid: str = "c0", rounds: int = 500) -> float:
    return draws[cid] / rounds


def test_a_client_lying_about_its_size_does_not_take_every_round(caplog):
    """A claim of 10^9 examples among nine clients of 10: without a cap it is drawn every
    time; with examples-cap-factor=3 it counts as 30 (of 120), and a claim above
    max-examples as 1 example, both logged with the client's id."""
    liar = [10 ** 9, *[10] * 9]

    def draws(cap_factor: float, max_examples: int = 0) -> Counter:
        manager = SeededClientManager(0, by_size=True, cap_factor=cap_factor,
                                      max_examples=max_examples)
        for i, size in enumerate(liar):
            manager.register(SizedProxy(f"c{i}", size))
        return Counter(proxy.cid for _ in range(500) for proxy in manager.sample(1))

    assert _share(draws(0.0)) > 0.99  # the attack, uncapped
    assert _share(draws(3.0)) == pytest.approx(30 / 120, abs=0.05)
    assert "client c0 reports 1000000000 training examples, sampled as 30" in caplog.text
    assert _share(draws(3.0, max_examples=1000)) == pytest.approx(1 / 91, abs=0.02)
    assert "exceeds the cap max-examples=1000" in caplog.text


def test_the_client_reports_its_training_set_size_only_when_the_run_samples_by_size():
    sized = make_config(client_sampling="size")
    node = {"partition-id": 3, "num-partitions": 10}
    assert client_for(sized, node).get_properties({})[NUM_EXAMPLES] == len(
        load_partition(DataSettings.from_config(sized), 3, 10).train)
    assert NUM_EXAMPLES not in client_for(make_config(), node).get_properties({})


@pytest.mark.parametrize("other", [
    dict(strategy="dp-fixed"), dict(secure_aggregation="secagg+", examples_cap_factor=0.0),
    dict(homomorphic_encryption="ckks", examples_cap_factor=0.0), dict(server_loop="fedbuff")])
def test_refused_where_a_size_must_not_reach_the_server_or_the_loop_samples_itself(other):
    make_config(**other)  # the control: fine with uniform sampling
    with pytest.raises(ConfigError, match="client-sampling"):
        make_config(client_sampling="size", **other)


def test_the_server_of_a_run_caps_sizes_as_its_config_caps_claims(tmp_path):
    cfg = make_config(client_sampling="size", strategy="qfedavg", examples_cap_factor=2.5,
                      max_examples=5000, out_dir=str(tmp_path))
    manager = server_components(cfg).server.client_manager()
    assert (manager.by_size, manager.cap_factor, manager.max_examples) == (True, 2.5, 5000)
