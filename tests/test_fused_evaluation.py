"""`fuse-evaluate` on the server: which runs fuse, and what a fit reply's evaluation may be."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_app.app.config import resolve
from fl_app.app.server_app import fit_config, fuses_evaluation
from fl_app.server.runner import fused_evaluations
from fl_app.wire import KEY_FUSE_EVALUATE
from tests.flower_objects import fit_res, results

ARRAYS = [np.zeros(3, dtype=np.float32)]


@pytest.mark.parametrize("extra, fused", [
    ({}, True),
    ({"fraction-evaluate": 0.0}, False),
    ({"secure-aggregation": "secagg+", "examples-cap-factor": 0.0}, False),  # protected
    ({"strategy": "dp-fixed", "noise-multiplier": 1.0, "clipping-norm": 1.0}, False),
    ({"strategy": "dp-fixed", "noise-multiplier": 1.0, "clipping-norm": 1.0,
      "dp-distributed-evaluation": True}, True),
])
def test_only_runs_that_evaluate_distributed_fuse(extra, fused):
    """Fusing never releases an evaluation a separate evaluate round would not have: not
    in a protected run, not under DP unless dp-distributed-evaluation asks for it."""
    cfg = resolve({"fuse-evaluate": True, **extra})
    assert fuses_evaluation(cfg) is fused
    assert (KEY_FUSE_EVALUATE in fit_config(cfg)(1)) is fused
    assert KEY_FUSE_EVALUATE not in fit_config(resolve(extra))(1)


def test_a_reply_whose_evaluation_is_not_a_loss_and_a_count_is_dropped():
    """A lying client's values are dropped, never a server crash (NaN or inf counts,
    float or bool counts, a non-finite or text loss)."""
    good = {"eval_loss": 0.5, "eval_num_examples": 10, "eval_accuracy": 0.75}
    bad = [{"eval_loss": 0.5, "eval_num_examples": math.nan},
           {"eval_loss": 0.5, "eval_num_examples": math.inf},
           {"eval_loss": 0.5, "eval_num_examples": 10.0},
           {"eval_loss": 0.5, "eval_num_examples": True},
           {"eval_loss": 0.5, "eval_num_examples": -1},
           {"eval_loss": math.nan, "eval_num_examples": 10},
           {"eval_loss": "low", "eval_num_examples": 10},
           {"eval_loss": 0.5}]
    replies = results([(ARRAYS, 1)] * (len(bad) + 2))
    metrics = [good, *bad, {"train_loss": 1.0}]  # the last fused nothing
    replies = [(proxy, fit_res(ARRAYS, 1, m)) for (proxy, _), m in zip(replies, metrics)]
    (proxy, report), = fused_evaluations(replies)
    assert proxy is replies[0][0]
    assert (report.loss, report.num_examples, report.metrics) == (0.5, 10, {"accuracy": 0.75})
