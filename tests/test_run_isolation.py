"""Nothing of one client or run stays readable in the trainer the process shares.

The trainer (one per process, run and model) keeps no weights between calls: after every
fit and evaluate it is back at the model's initial weights, so `get_parameters` (asked of
any client of any later run) never returns a client's trained model or a decrypted global
model. Real KerasClients on real data.
"""

from __future__ import annotations

import numpy as np

from fl_app.app.local_client import client_for
from fl_app.data.sources import data_spec
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.wire import round_config
from tests.conftest import make_config

CFG = make_config(optimizer="adam", learning_rate=0.01, local_epochs=2)


def _node(partition: int) -> dict[str, int]:
    return {"partition-id": partition, "num-partitions": 10}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_next_client_or_run_never_gets_a_fits_weights():
    initial = [w.copy() for w in client_for(CFG, _node(0), run_id=1).get_parameters({})]
    sent = [w + 0.01 for w in initial]  # a global model: not the initial weights either
    trained, _, _ = client_for(CFG, _node(0), run_id=1).fit(sent, round_config(CFG, 1))
    assert not _same(trained, sent) and not _same(trained, initial)  # it trained
    kept = [w.copy() for w in trained]
    for run_id, partition in ((1, 1), (2, 0), (2, 1)):  # another client, a later run
        handed = client_for(CFG, _node(partition), run_id=run_id).get_parameters({})
        assert not _same(handed, trained) and not _same(handed, sent)
        assert _same(handed, initial)
    assert _same(trained, kept)  # the reply itself was not reset under the caller


def test_an_evaluated_global_model_is_not_kept_either():
    client = client_for(CFG, _node(2), run_id=3)
    initial = [w.copy() for w in client.get_parameters({})]
    decrypted = [w - 0.02 for w in initial]  # e.g. an HE run's global model, in the clear
    client.evaluate(decrypted, {})
    assert _same(client_for(CFG, _node(3), run_id=4).get_parameters({}), initial)
    assert _same(client.get_parameters({}), initial)


def test_each_run_has_its_own_trainer():
    spec = data_spec(DataSettings.from_config(CFG))
    train = TrainSettings.from_config(CFG)
    assert trainer_for(train, spec, 5) is trainer_for(train, spec, 5)  # built once per run
    train = TrainSettings.from_config(CFG)
    assert trainer_for(train, spec, 5) is not trainer_for(train, spec, 6)
