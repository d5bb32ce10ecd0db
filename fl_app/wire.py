"""The keys the server and its clients exchange, and the per-round fit config.

Both sides import these names from here, so neither imports the other: the server sends
`round_config` in every `FitIns`, asks each client for its `CLIENT_KEY` property, and
reads the DP keys back from the client's fit metrics. With update compression, the
fit config names the codec the client encodes its update with (`fl_app.codecs`). The
clipping keys are the ones Flower's `fixedclipping_mod`/`adaptiveclipping_mod` use, and
`KEY_PROXIMAL_MU` is the one Flower's FedProx sends, so our clients work with Flower's
strategies and mods.
"""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.schema import Scalar

SERVER_ROUND = "server-round"  # fit/evaluate config: the round being played (int)
ROUND_KEYS = ("local-epochs", "batch-size", "learning-rate")  # run-config keys sent per round
CLIENT_KEY = "client-key"  # get_properties: a name for this client that is stable across runs
KEY_PROXIMAL_MU = "proximal_mu"  # fit config (Flower's FedProx): weight of the proximal term
KEY_CLIPPING_NORM = "clipping_norm"  # fit config: the clip norm C for this round (float)
KEY_HE_ENCRYPTED = "he-encrypted"  # fit/evaluate config: the parameters are the CKKS aggregate
KEY_DP_NOISE_STD = "dp_noise_std"  # fit config: std of the noise a client adds (distributed DP)
KEY_NORM_BIT = "norm_bit"  # fit metrics: True when the client's update had to be clipped
KEY_STRAGGLER_EPOCHS = "straggler-epochs"  # fit config: a straggler's partial epochs (int)
KEY_LOCAL_STEPS = "local_steps"  # fit metrics: local optimizer steps taken (FedNova's tau)
KEY_BATCH_SIZE = "batch_size"  # fit metrics (round-time-budget): the batch size a node chose
KEY_LR_SCALE = "lr_scale"  # fit metrics (round-time-budget): its learning-rate factor b'/b
MAX_LR_SCALE = 4.0  # round-time-budget: a node's batch (and rate) is b/4 .. 4b of its own
KEY_LOSS_BEFORE = "loss_before"  # fit config: report it; fit metrics: the loss of the
# received model on the client's own training data, before training (q-FFL's F_k)
CLIENT_SAMPLING = "client-sampling"  # run-config key: 'size' samples clients by size
SECAGG_MIN_CLIENTS = "secagg-min-clients"  # run-config key: the fewest clients a SecAgg+ round
SECAGG_MIN_CLIENTS_DEFAULT = 5  # may sum (server and clients refuse fewer), and its default
NUM_EXAMPLES = "num-examples"  # get_properties (client-sampling='size'): training-set size
DATA_QUALITY_PREFIX = "data_"  # fit metrics: the client's data-quality report (data_rows, ...)
TIMING_PREFIX = "time_"  # fit metrics: seconds the message spent per phase (time_training, ...)
KEY_COMPRESS_UP = "compress-up"  # fit config: the codec the client encodes its update with
KEY_COMPRESS_TOP_K = "compress-top-k"  # fit config: the fraction of entries top-k keeps
KEY_ERROR_FEEDBACK = "error-feedback"  # fit config: carry the encoding error to next round
KEY_PRUNE_SPARSITY = "prune-sparsity"  # fit config: the sparsity of the round's pruning mask
KEY_FUSE_EVALUATE = "fuse-evaluate"  # fit config: evaluate the received model before training
KEY_STATISTICS = "statistics"  # fit config: reply with the data's sums, not trained weights
KEY_STANDARDIZATION = "standardization"  # fit/evaluate config: the pooled statistics (bytes)
FUSED_PREFIX = "eval_"  # fit metrics: that evaluation (eval_loss, eval_num_examples, eval_<metric>)
FUSED_LOSS = FUSED_PREFIX + "loss"
FUSED_COUNT = FUSED_PREFIX + "num_examples"
# The records of Flower's compat messages (`flwr.compat.common.recorddict_compat`), by name:
FIT_CONFIG = "fitins.config"  # a fit message's config record (FitIns.config)
FIT_METRICS = "fitres.metrics"  # a fit reply's metrics record (FitRes.metrics)
FIT_COUNT = "fitres.num_examples"  # a fit reply's example-count record (FitRes.num_examples)


def round_config(cfg: Mapping[str, Scalar], server_round: int) -> dict[str, Scalar]:
    """The per-round fit config the server sends (clients fall back to their own run config)."""
    return {SERVER_ROUND: server_round, **{key: cfg[key] for key in ROUND_KEYS}}


def evaluate_config(server_round: int) -> dict[str, Scalar]:
    """The per-round evaluate config the server sends."""
    return {SERVER_ROUND: server_round}
