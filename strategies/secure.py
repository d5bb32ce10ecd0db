"""Secure aggregation settings, and the refusal of what cannot work without individual updates.

Under secure aggregation (`secure-aggregation=secagg+`: Flower's SecAgg+, Bell et al., 2020,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") the server never holds
one client's update, only the sum of the round's updates. Every mechanism that looks at an
individual update therefore cannot run: robust aggregators (Krum, Bulyan, median, trimmed
mean), aggregators that scale each update by its own client's figure (FedNova's local
steps, q-FFL's client loss), the outlier-norm check, the per-update caps, the pruning
mask's check (`prune-sparsity`) and server-side DP clipping. Which strategies those are is
each strategy's spec (`strategies.spec`); `strategies.combinations` refuses them, with the
per-update checks listed here (`per_update_checks`), in one `ConfigError`. (Homomorphic
encryption also refuses what needs a plaintext model on the server.)

What still holds: the aggregate's array count, shapes, dtypes and finiteness are checked by
`ValidatedStrategy` as before; each honest client checks its own update (shapes, finite
values) before masking it and clips it itself under `dp-client-fixed`; the server counts the
clients whose masked vectors made it into the sum.

A protected run (SecAgg+ or homomorphic encryption, `protected`) has no distributed
evaluation: each client's evaluation reply (loss, validation-set size) would go to the server
in the clear, so `evaluate_fraction` is 0 there and a `distributed_*` monitor is refused. A
SecAgg+ round needs `secagg-min-clients` clients (the server does not start a smaller one,
and each client refuses one) and a reconstruction threshold above half the shares (with half
or fewer, a server that asks some clients for a client's mask seed and others for its mask
key could rebuild both).
"""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.schema import ConfigError, Scalar, Setting
from fl_app.wire import SECAGG_MIN_CLIENTS, SECAGG_MIN_CLIENTS_DEFAULT

SECURE_MODES = ("none", "secagg+")
PER_UPDATE_CHECKS = ("outlier-norm-factor", "examples-cap-factor", "max-examples",
                     "prune-sparsity")
"""Server-side checks of one update or one client's weight, by run-config key (0: off)."""

SETTINGS = [
    Setting("secure-aggregation", str, "none",
            "Secure aggregation: 'none', or 'secagg+' (Flower's SecAgg+: the server sees only "
            "the sum of the masked, quantized updates).", "secure", choices=SECURE_MODES),
    Setting("secagg-num-shares", float, 1.0,
            "SecAgg+: shares each client's secrets are split into: a fraction of the round's "
            "clients if <= 1, else a count (> 2).", "secure", low=0.0, low_open=True),
    Setting("secagg-reconstruction-threshold", float, 0.6,
            "SecAgg+: shares needed to rebuild a secret: a fraction of the shares if <= 1, "
            "else a count (< shares). Fewer colluding clients learn nothing; each client needs "
            "this many neighbours alive for the round to finish. Must be above half the shares "
            "(> 0.5).", "secure", low=0.0, low_open=True),
    Setting(SECAGG_MIN_CLIENTS, int, SECAGG_MIN_CLIENTS_DEFAULT,
            "SecAgg+: the fewest clients a round may sum: the server does not start a round "
            "with fewer sampled, and each client refuses a round (or an unmasking) with fewer "
            "(a small sum says much about each update; lower it only for a toy cohort).",
            "secure", low=2),
    Setting("secagg-clipping-range", float, 8.0,
            "SecAgg+: each coordinate of a client's weighted update (n/max-weight times "
            "w - w_global) is clamped to [-r, r] before quantization.", "secure", low=0.0,
            low_open=True),
    Setting("secagg-quantization-range", int, 4194304,
            "SecAgg+: quantization levels Q over [-r, r] (step 2r/Q); k clients need k*Q < "
            "2^32.", "secure", low=2, high=2 ** 31),
    Setting("secagg-max-weight", float, 1000.0,
            "SecAgg+: the example count that scales an update by 1; a client's update is "
            "scaled by n/max-weight (keep n*max|w - w_global|/max-weight <= clipping range; "
            "dp-client-fixed uses 1: its clients report n=1).",
            "secure", low=0.0, low_open=True),
]


def per_update_checks(values: Mapping[str, Scalar]) -> list[str]:
    """The server-side checks of one update that `values` turns on, as `key=value`
    strings (the strategy's own needs are its spec's: `strategies.combinations`)."""
    return [f"{key}={values[key]}" for key in PER_UPDATE_CHECKS if values[key]]


def protected(values: Mapping[str, Scalar]) -> bool:
    """Whether the run protects each client's update (SecAgg+ or homomorphic encryption)."""
    return values["secure-aggregation"] != "none" or values["homomorphic-encryption"] != "none"


def evaluate_fraction(values: Mapping[str, Scalar]) -> float:
    """The fraction of clients sampled for distributed evaluation: `fraction-evaluate`, or 0
    in a protected run (a client's evaluation reply would be in the clear)."""
    return 0.0 if protected(values) else float(values["fraction-evaluate"])


def check_config(values: Mapping[str, Scalar]) -> None:
    """Refuse a distributed monitor in a protected run; refuse SecAgg+ combined with
    another protection or a codec, a threshold of half the shares or fewer, and ranges whose
    sum could overflow the protocol's 2^32 modulus (what needs individual updates is
    refused by `strategies.combinations`)."""
    if protected(values) and str(values["monitor"]).startswith("distributed_"):
        mode = "secure-aggregation" if values["secure-aggregation"] != "none" \
            else "homomorphic-encryption"
        raise ConfigError(
            f"run-config key 'monitor'={values['monitor']!r} cannot work with {mode}="
            f"{values[mode]!r}: a protected run has no distributed evaluation (each client's "
            "loss and validation-set size would reach the server in the clear); monitor a "
            "centralized metric")
    if values["secure-aggregation"] == "none":
        return
    others = [f"{key}={values[key]!r}" for key in ("homomorphic-encryption", "compress-up",
                                                    "compress-down") if values[key] != "none"]
    if others:
        raise ConfigError(f"run-config key(s) {', '.join(others)} cannot work with "
                          "secure-aggregation='secagg+': SecAgg+ quantizes and masks the "
                          "plain update itself; use one of them at a time")
    shares = float(values["secagg-num-shares"])
    threshold = float(values["secagg-reconstruction-threshold"])
    if shares > 1 and (shares != int(shares) or shares <= 2):
        raise ConfigError(f"run-config key 'secagg-num-shares' ({shares:g}) must be a fraction "
                          "<= 1 or a whole count > 2")
    if threshold > 1 and (threshold != int(threshold) or (shares > 1 and threshold >= shares)):
        raise ConfigError(
            f"run-config key 'secagg-reconstruction-threshold' ({threshold:g}) must be a "
            f"fraction <= 1 or a whole count below 'secagg-num-shares' ({shares:g})")
    if shares <= 1 < threshold:
        raise ConfigError(
            "run-config key 'secagg-reconstruction-threshold' must be a fraction (<= 1) when "
            "'secagg-num-shares' is a fraction: the share count is only known per round")
    if threshold <= 0.5 or (shares > 1 and 2 * threshold <= shares):
        raise ConfigError(
            f"run-config key 'secagg-reconstruction-threshold' ({threshold:g}) must be above "
            "half the shares: with half or fewer, a server that asks some clients for a "
            "client's mask seed and the others for its mask key rebuilds both, and that "
            "client's update")


def share_count(value: float) -> int | float:
    """A share or threshold setting as Flower's SecAggPlusWorkflow takes it: a fraction
    (float) if <= 1, else a count (int)."""
    return float(value) if value <= 1 else int(value)
