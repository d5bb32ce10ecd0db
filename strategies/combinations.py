"""Which strategy runs with which mode: every refusal derived from the specs' flags.

`SPECS` is every registered strategy and DP wrapper (`strategies.spec.StrategySpec`), by
name. The rules, one per mode, read only the flags:

    secure-aggregation=secagg+    the strategy `sums` (and no per-update check is on)
    homomorphic-encryption=ckks   the strategy is `linear` (a DP wrapper never is)
    server-loop=fedbuff           the strategy is `linear`
    dp-inner under a DP wrapper   the inner strategy `takes_private_average`

A spec that leaves a flag unset is refused by its rule, naming what it does not declare.
"""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.schema import ConfigError, Scalar
from strategies import (
    distributed_dp,
    dp,
    fednova,
    flower_builtins,
    homomorphic,
    qffl,
    secure,
    weighted_fedavg,
)
from strategies.spec import StrategySpec

STRATEGY_MODULES = [weighted_fedavg, fednova, flower_builtins, qffl]
WRAPPER_MODULES = [dp, distributed_dp]

SPECS: dict[str, StrategySpec] = {
    spec.name: spec for module in (*STRATEGY_MODULES, *WRAPPER_MODULES) for spec in module.SPECS}
"""Every registered strategy and wrapper, by registry name."""


def spec_of(values: Mapping[str, Scalar], key: str = "strategy") -> StrategySpec:
    """The spec named by run-config key `key` (`strategy` or `dp-inner`)."""
    return SPECS[str(values[key])]


def names_with(flag: str, wrappers: bool = False) -> list[str]:
    """The registered plain strategies (or, with `wrappers`, DP wrappers) that set capability
    `flag`."""
    return [name for name, spec in SPECS.items() if spec.wrapper == wrappers and spec.can(flag)]


def _what_it_does(spec: StrategySpec, flag: str) -> str:
    return spec.needs or f"does not declare itself '{flag}'"


def needs_individual_updates(values: Mapping[str, Scalar]) -> list[str]:
    """The settings in `values` that need the server to see individual client updates, as
    `key='value'` strings (empty: everything configured works on the sum alone)."""
    strategy = [] if spec_of(values).can("sums") else [f"strategy='{values['strategy']}'"]
    return strategy + secure.per_update_checks(values)


def refuse_secure_aggregation(values: Mapping[str, Scalar]) -> None:
    """Raise ConfigError naming every setting that needs individual updates under SecAgg+."""
    found = needs_individual_updates(values)
    if values["secure-aggregation"] == "none" or not found:
        return
    spec = spec_of(values)
    why = "" if spec.can("sums") else f" (strategy {spec.name} {_what_it_does(spec, 'sums')})"
    raise ConfigError(
        f"run-config key(s) {', '.join(found)} cannot work with secure-aggregation="
        f"'{values['secure-aggregation']}': the server sees only the sum of the clients' "
        f"updates, never one update, so it cannot compare, clip, reject or re-weight them{why}; "
        "use "
        f"a strategy that sums ({', '.join(names_with('sums'))}) or "
        f"{' / '.join(names_with('sums', wrappers=True))}, and set "
        "those checks to 0")


def homomorphic_problems(values: Mapping[str, Scalar]) -> list[str]:
    """Why the run config cannot run with homomorphic encryption (empty: it can): the
    strategy's flag, then `strategies.homomorphic.incompatibilities`."""
    if values["homomorphic-encryption"] == "none":
        return []
    spec = spec_of(values)
    problems = []
    if spec.wrapper:
        problems.append(f"strategy={spec.name!r} clips and noises on the server, which sees "
                        "only ciphertexts")
    elif not spec.can("linear"):
        problems.append(f"strategy={spec.name!r} needs individual updates or a plaintext "
                        f"server-side model: it {_what_it_does(spec, 'linear')} (use one of "
                        f"{', '.join(names_with('linear'))})")
    return problems + homomorphic.incompatibilities(values)


def refuse_fedbuff(values: Mapping[str, Scalar]) -> None:
    """Raise ConfigError when FedBuff's loop runs a strategy that is not `linear`."""
    spec = spec_of(values)
    if values["server-loop"] != "fedbuff" or spec.can("linear"):
        return
    raise ConfigError(
        f"run-config keys 'server-loop'='fedbuff' and 'strategy'={spec.name!r} cannot be "
        f"combined: FedBuff's server step replaces the strategy's own aggregation, and "
        f"{spec.name} {_what_it_does(spec, 'linear')}; use strategy "
        f"{' / '.join(names_with('linear'))} with FedBuff, or server-loop='sync'")


def refuse_dp_inner(values: Mapping[str, Scalar]) -> None:
    """Raise ConfigError when a DP wrapper's `dp-inner` cannot take a privatized average."""
    if not spec_of(values).wrapper:
        return
    inner = spec_of(values, "dp-inner")
    if not inner.can("takes_private_average"):
        raise ConfigError(
            f"run-config key 'dp-inner' is '{inner.name}' under strategy="
            f"{values['strategy']!r}: {inner.name} "
            f"{_what_it_does(inner, 'takes_private_average')}, which a DP release does not "
            "carry; use another dp-inner")


def check_config(values: Mapping[str, Scalar]) -> None:
    """Every strategy-by-mode rule (module doc), each raising ConfigError."""
    refuse_dp_inner(values)
    refuse_secure_aggregation(values)
    problems = homomorphic_problems(values)
    if problems:
        raise ConfigError("homomorphic-encryption='ckks' cannot run with " + "; ".join(problems))
    refuse_fedbuff(values)
