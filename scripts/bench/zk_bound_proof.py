"""Table: a zero-knowledge proof (ezkl, Halo2/KZG) that a SecAgg+ client's quantized update
is within an L2 bound, its setup, prover and verifier cost and proof size per client.

    pip install ezkl onnx py_ecc     # not project dependencies: in a separate virtualenv
    python -m scripts.bench.zk_bound_proof [--sizes 1000 4800 20000] [--bound 1.0]

The client's update u (n float parameters) is quantized as Flower's `secaggplus_mod` does
it before masking (`flwr.common.secure_aggregation.quantization.quantize`: clipped to
±clipping-range, mapped to integers q in [0, quantization-range)). The circuit is a small
ONNX graph over q: `ok = (sum((q - R/2)^2) <= B)`, with B = (bound * R / (2 * clip))^2 the
L2 bound in quantized units and R/2 the quantizer's zero; B and R/2 are fixed columns, so
the verifying key commits to them. q is private, committed in the proof as a KZG commitment
(`--visibility polycommit`, the default) or a Poseidon hash (`hashed/public`); ok is the
one public output. The server accepts a client whose proof verifies with ok = 1.

Per size the script builds the circuit (rows and logrows from ezkl's settings), generates
the SRS locally (`ezkl.gen_srs`: a locally made SRS is for measurement only — whoever makes
it can forge proofs; a deployment needs a ceremony SRS), runs the key setup, then proves and
verifies four cases (`CASES`): a valid update (norm bound/2: must verify with ok = 1), an
update over the bound (norm 2·bound: ok = 0, so the server drops it), a forged claim (that
over-bound witness with its output set to ok = 1: must fail to prove or to verify) and the
largest update the quantizer lets through (every coordinate at the clipping range: beyond
the comparison's range checks, so no valid proof). With polycommit it also checks the binding
as a server would (`binding_checks`): the proof verifies against the commitment C_i the
client sends beside it and not against another's, and the clients' commitments add up to
the commitment of the sum that SecAgg+ unmasks. Each size runs in its own process (its peak
RSS is its own), stopped above `--max-rss-gib` or `--timeout`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scripts.bench.results_page import add_results_option, recorded

if TYPE_CHECKING:
    import numpy as np

CLIPPING_RANGE = 8.0  # the run config's secagg-clipping-range default
QUANTIZATION_RANGE = 4194304  # the run config's secagg-quantization-range default (2^22)
DECOMP_BASE = 16384  # ezkl's default range-check base (a 2^14-row lookup table)


REQUIRED = ("ezkl", "onnx", "numpy", "flwr", "py_ecc")


def require_ezkl() -> Any:
    """The `ezkl` module; exits with a message naming what is missing when ezkl, onnx,
    numpy or flwr is not installed."""
    if missing := [name for name in REQUIRED if find_spec(name) is None]:
        sys.exit(f"zk_bound_proof: {', '.join(missing)} not installed. ezkl is not a project "
                 "dependency: install it in a separate virtualenv (python -m venv .zkvenv && "
                 ".zkvenv/bin/pip install ezkl onnx numpy flwr py_ecc) and run this script "
                 "with it.")
    import ezkl

    return ezkl


def quantized_bound(bound: float, clip: float, target_range: int) -> int:
    """The L2 bound `bound` on the float update as a bound on the sum of squares of the
    centred quantized update (Flower's quantizer: R / (2 * clip) integers per unit), rounded
    down to a float32 (the ONNX graph's constant)."""
    import numpy as np

    exact = math.floor((bound * target_range / (2 * clip)) ** 2)
    as_float32 = np.float32(exact)
    if int(as_float32) > exact:
        as_float32 = np.nextafter(as_float32, np.float32(0))
    return int(as_float32)


def quantized_update(n: int, norm: float | None, rng: np.random.Generator, clip: float,
                     target_range: int) -> np.ndarray:
    """A random update of `n` parameters with L2 norm `norm` (None: every coordinate at
    ±`clip`), quantized by Flower's SecAgg+ quantizer (stochastic rounding), as the
    integers that enter the masked sum."""
    import numpy as np

    from fl_app.flower_internals import quantize

    update = rng.standard_normal(n)
    update = clip * np.sign(update) if norm is None else update * norm / np.linalg.norm(update)
    return quantize([update], clip, target_range)[0].astype(np.int64)


def bound_graph(n: int, centre: int, bound_sq: int) -> Any:
    """The ONNX graph `ok = float(sum((q - centre)^2) <= bound_sq)` over q of shape (1, n)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.array([centre], np.float32), "centre"),
                 numpy_helper.from_array(np.array(bound_sq, np.float32), "bound"),
                 numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Sub", ["q", "centre"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceSum", ["d2", "axes"], ["s"], keepdims=0),
             helper.make_node("LessOrEqual", ["s", "bound"], ["within"]),
             helper.make_node("Cast", ["within"], ["ok"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "l2_bound", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("ok", TensorProto.FLOAT, [1])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def decomp_legs(bound_sq: int) -> int:
    """The range-check legs (base `DECOMP_BASE`) that hold ±16·bound_sq: ezkl decomposes
    the comparison's difference, so a sum of squares beyond that has no valid witness (no
    proof), one up to 17·bound_sq a proof of ok = 0."""
    return max(2, math.ceil(math.log(16 * bound_sq + 1, DECOMP_BASE)))


def _timed(step: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """`step(*args, **kwargs)` and its wall seconds."""
    start = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - start


def _prove_and_verify(ezkl: Any, folder: Path, update: str, srs: Path,
                      forge_ok: bool = False) -> dict[str, Any]:
    """Witness, proof and verification of the update in `folder/<update>.input.json`; with
    `forge_ok` the witness's public output is set to ok = 1 before proving. Returns whether
    it proved and verified, the public output, the seconds and the proof's bytes."""
    circuit, name = folder / "circuit.ezkl", update + ("-forged" if forge_ok else "")
    witness, proof = folder / f"{name}.witness.json", folder / f"{name}.proof.json"
    try:
        ezkl.gen_witness(str(folder / f"{update}.input.json"), str(circuit), str(witness),
                         vk_path=str(folder / "vk.key"), srs_path=str(srs))
        if forge_ok:
            data = json.loads(witness.read_text())
            data["outputs"][0][0] = ezkl.float_to_felt(1.0, 0, ezkl.PyInputType.F32)
            witness.write_text(json.dumps(data))
        _, prove_s = _timed(ezkl.prove, str(witness), str(circuit), str(folder / "pk.key"),
                            str(proof), srs_path=str(srs))
    except (RuntimeError, ValueError) as failed:
        return {"proved": False, "verified": False, "why": str(failed)[:300]}
    try:
        verified, verify_s = _timed(ezkl.verify, str(proof), str(folder / "settings.json"),
                                    str(folder / "vk.key"), srs_path=str(srs))
    except (RuntimeError, ValueError) as failed:
        verified, verify_s = False, float("nan")
        print(f"  {name}: verify raised {str(failed)[:300]}", file=sys.stderr)
    body = json.loads(proof.read_text())
    return {"proved": True, "verified": bool(verified), "prove_s": prove_s,
            "verify_s": verify_s, "proof_bytes": len(body["proof"]),
            "ok": [ezkl.felt_to_int(felt) for felt in body["instances"][-1]],
            "instances": [len(column) for column in body["instances"]]}


def _compressed(point: Any) -> str:
    """A G1 point from `ezkl.kzg_commit` in the witness file's form: x little-endian, the
    top bit set when y is odd (halo2curves' serialization; no curve arithmetic)."""
    x = bytearray.fromhex(point.x)
    x[-1] |= 0x80 * (bytes.fromhex(point.y)[0] & 1)
    return x.hex()


def _verifies_against(ezkl: Any, folder: Path, proof: str, commitment: str, srs: Path) -> bool:
    """Whether `folder/<proof>.proof.json` verifies with `commitment` (compressed) swapped
    in as the committed update, from a witness file the server writes with only it."""
    witness, swapped = folder / "server.witness.json", folder / "server.proof.json"
    witness.write_text(json.dumps({
        "inputs": [], "pretty_elements": None, "outputs": [],
        "processed_inputs": {"poseidon_hash": None, "polycommit": [[commitment]]},
        "processed_params": None, "processed_outputs": None, "max_lookup_inputs": 0,
        "min_lookup_inputs": 0, "max_range_size": 0}))
    swapped.write_bytes((folder / f"{proof}.proof.json").read_bytes())
    try:
        ezkl.swap_proof_commitments(str(swapped), str(witness))
        return bool(ezkl.verify(str(swapped), str(folder / "settings.json"),
                                str(folder / "vk.key"), srs_path=str(srs)))
    except (RuntimeError, ValueError):
        return False


def binding_checks(ezkl: Any, folder: Path, srs: Path) -> dict[str, bool]:
    """The polycommit binding as a server would check it, with the valid and the over-bound
    updates as two clients': each client sends C_i = kzg_commit(q_i) beside its proof;
    `proof_is_of_c`: the proof's own commitment is C_i; `own_c_verifies` /
    `other_c_verifies`: the valid proof verifies with C_i swapped in, not with the other
    client's; `sum_matches`: KZG commitments add, so sum C_i = C(sum q_i) + (m - 1) C(0)
    (C(0) commits ezkl's unusable rows, set to one) with sum q_i what SecAgg+ unmasks;
    `off_by_one_matches`: the same check against a sum off by one in one coordinate."""
    from py_ecc.bn128 import FQ, add, eq

    vk, settings = str(folder / "vk.key"), str(folder / "settings.json")

    def commit(values: list[int]) -> Any:
        felts = [ezkl.float_to_felt(float(v), 0, ezkl.PyInputType.F32) for v in values]
        return ezkl.kzg_commit(felts, vk, settings, str(srs))[0]

    def point(commitment: Any) -> tuple[FQ, FQ]:
        return (FQ(int.from_bytes(bytes.fromhex(commitment.x), "little")),
                FQ(int.from_bytes(bytes.fromhex(commitment.y), "little")))

    updates = [json.loads((folder / f"{name}.input.json").read_text())["input_data"][0]
               for name in ("valid", "over")]
    commits = [commit(update) for update in updates]
    total = [int(a + b) for a, b in zip(*updates)]
    added, zero = add(*(point(c) for c in commits)), point(commit([0] * len(total)))
    own = json.loads((folder / "valid.witness.json").read_text())
    return {
        "proof_is_of_c": own["processed_inputs"]["polycommit"][0][0] == _compressed(commits[0]),
        "own_c_verifies": _verifies_against(ezkl, folder, "valid", _compressed(commits[0]), srs),
        "other_c_verifies": _verifies_against(ezkl, folder, "valid", _compressed(commits[1]),
                                              srs),
        "sum_matches": eq(added, add(point(commit(total)), zero)),
        "off_by_one_matches": eq(added, add(point(commit([total[0] + 1, *total[1:]])), zero)),
    }


CASES = {"valid": (0.5, False), "over": (2.0, False), "forged": (2.0, True),
         "max": (None, False)}
"""Each case: its update's norm as a multiple of the bound (None: every coordinate at the
clipping range, the largest update Flower's quantizer lets through) and whether the
witness's output is forged to ok = 1."""


def measure(n: int, bound: float, visibility: str, inner_cols: int, srs_dir: Path,
            seed: int, only_valid: bool = False) -> dict[str, Any]:
    """Build, set up, prove and verify the bound circuit for `n` parameters (this process):
    the table's row, with each of `CASES` (only the valid one with `only_valid`)."""
    ezkl = require_ezkl()
    import numpy as np
    import onnx

    bound_sq = quantized_bound(bound, CLIPPING_RANGE, QUANTIZATION_RANGE)
    rng = np.random.default_rng(seed)
    row: dict[str, Any] = {"n": n, "bound_sq": bound_sq}
    with tempfile.TemporaryDirectory(prefix="zk-bound-") as tmp:
        folder = Path(tmp)
        onnx.save(bound_graph(n, QUANTIZATION_RANGE // 2, bound_sq), folder / "bound.onnx")
        args = ezkl.PyRunArgs()
        args.input_scale, args.param_scale = 0, 0  # integers in, integers out
        args.input_visibility, args.output_visibility = visibility, "public"
        args.param_visibility = "fixed"
        args.decomp_base, args.decomp_legs = DECOMP_BASE, decomp_legs(bound_sq)
        args.num_inner_cols = inner_cols
        settings_path = folder / "settings.json"
        ezkl.gen_settings(str(folder / "bound.onnx"), str(settings_path), py_run_args=args)
        settings = json.loads(settings_path.read_text())
        # the rows and the blinding rows in 2^k (ezkl splits the 2^14-row range-check
        # table over columns when it does not fit)
        logrows = math.ceil(math.log2(settings["num_rows"] + 64))
        settings["run_args"]["logrows"] = logrows
        settings_path.write_text(json.dumps(settings))
        row.update(rows=settings["num_rows"], cells=settings["total_assignments"],
                   logrows=logrows, legs=args.decomp_legs)
        circuit = folder / "circuit.ezkl"
        ezkl.compile_circuit(str(folder / "bound.onnx"), str(circuit), str(settings_path))
        srs = srs_dir / f"kzg{logrows}.srs"
        row["srs_s"] = None  # reused from an earlier run
        if not srs.exists():
            _, row["srs_s"] = _timed(ezkl.gen_srs, str(srs), logrows)
        for name, (multiple, _) in CASES.items():
            q = quantized_update(n, None if multiple is None else multiple * bound, rng,
                                 CLIPPING_RANGE, QUANTIZATION_RANGE)
            (folder / f"{name}.input.json").write_text(
                json.dumps({"input_data": [q.astype(float).tolist()]}))
            row[f"{name}_sumsq"] = int(((q - QUANTIZATION_RANGE // 2) ** 2).sum())
        ezkl.gen_witness(str(folder / "valid.input.json"), str(circuit),
                         str(folder / "setup.witness.json"))
        _, row["setup_s"] = _timed(ezkl.setup, str(circuit), str(folder / "vk.key"),
                                   str(folder / "pk.key"), srs_path=str(srs),
                                   witness_path=str(folder / "setup.witness.json"))
        row["pk_bytes"] = (folder / "pk.key").stat().st_size
        row["vk_bytes"] = (folder / "vk.key").stat().st_size
        for name, (_, forge_ok) in CASES.items():
            if name == "valid" or not only_valid:
                update = "over" if forge_ok else name
                row[name] = _prove_and_verify(ezkl, folder, update, srs, forge_ok)
        if visibility == "polycommit" and not only_valid:
            row["binding"] = binding_checks(ezkl, folder, srs)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _rss_mib(pid: int) -> float:
    """A live process's resident memory (MiB), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure_in_child(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """`measure` for `n` in a fresh process (its own peak RSS), killed above
    `args.max_rss_gib` or after `args.timeout` seconds."""
    command = [sys.executable, "-m", "scripts.bench.zk_bound_proof", "--one", str(n),
               "--bound", str(args.bound), "--visibility", args.visibility,
               "--inner-cols", str(args.inner_cols),
               "--srs-dir", str(args.srs_dir), "--seed", str(args.seed)]
    command += ["--only-valid"] if args.only_valid else []
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    stopped: list[str] = []

    def watch() -> None:
        start = time.monotonic()
        while child.poll() is None:
            if _rss_mib(child.pid) > args.max_rss_gib * 1024:
                stopped.append(f"over {args.max_rss_gib} GiB RSS")
            elif time.monotonic() - start > args.timeout:
                stopped.append(f"over {args.timeout} s")
            if stopped:
                child.kill()
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = child.communicate()
    watcher.join()
    if stopped or child.returncode != 0:
        return {"n": n, "failed": stopped[0] if stopped else f"exit {child.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def outcome(case: dict[str, Any]) -> str:
    """What the server does with one case's proof: accepted only when it verifies with
    the public output ok = 1."""
    if not case.get("proved"):
        return "dropped: no proof"
    if not case["verified"]:
        return "dropped: fails verification"
    return "accepted" if case["ok"] == [1] else f"dropped: ok={case['ok'][0]}"


def binding(checks: dict[str, bool] | None) -> str:
    """The binding checks in a table cell: whether the valid proof verifies with its own
    commitment and with another client's, and whether the commitments' sum matches the
    unmasked sum and a sum off by one (expected: yes, no, yes, no)."""
    if not checks or not checks["proof_is_of_c"]:
        return "-" if not checks else "proof not of C_i"
    keys = ("own_c_verifies", "other_c_verifies", "sum_matches", "off_by_one_matches")
    return ", ".join("yes" if checks[key] else "no" for key in keys)


def table(rows: list[dict[str, Any]]) -> str:
    """The measured rows as a Markdown table."""
    head = ("| parameters | rows | logrows | SRS gen s | setup s | pk MB | prove s | verify s "
            "| proof bytes | peak RSS MiB | " + " | ".join(CASES)
            + " | binding: own C, other C, sum, sum+1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['n']:,} | stopped: {row['failed']} |")
            continue
        valid = row["valid"]
        lines.append(
            f"| {row['n']:,} | {row['rows']:,} | {row['logrows']} "
            f"| {'cached' if row['srs_s'] is None else format(row['srs_s'], '.1f')} "
            f"| {row['setup_s']:.1f} | {row['pk_bytes'] / 1e6:.0f} "
            f"| {valid.get('prove_s', float('nan')):.1f} "
            f"| {valid.get('verify_s', float('nan')):.3f} | {valid.get('proof_bytes', 0):,} "
            f"| {row['peak_rss_mib']:.0f} | "
            + " | ".join(outcome(row[name]) if name in row else "-" for name in CASES)
            + f" | {binding(row.get('binding'))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4800, 20000],
                        help="parameter counts, one row each (1000 4800 20000)")
    parser.add_argument("--bound", type=float, default=1.0,
                        help="the round's L2 bound on the float update (1.0)")
    parser.add_argument("--visibility", default="polycommit",
                        choices=["polycommit", "hashed/public", "private"],
                        help="how the proof holds the update: a KZG commitment (default), a "
                             "Poseidon hash, or nothing (unbound)")
    parser.add_argument("--inner-cols", type=int, default=4,
                        help="ezkl's columns per row (4)")
    parser.add_argument("--srs-dir", type=Path, default=Path(tempfile.gettempdir()) / "zk-srs",
                        help="where locally generated SRS files are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-gib", type=float, default=7.0,
                        help="stop a size whose process grows above this (7)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="stop a size after this many seconds (600)")
    parser.add_argument("--only-valid", action="store_true",
                        help="prove only the valid update (large sizes)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    add_results_option(parser)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure each size (each in its own process) and print the table."""
    args = parse_args(argv)
    require_ezkl()
    args.srs_dir.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.bound, args.visibility, args.inner_cols,
                                 args.srs_dir, args.seed, args.only_valid)))
        return
    rows = []
    for n in args.sizes:
        rows.append(measure_in_child(n, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    with recorded("zk-bound-proof", "scripts.bench.zk_bound_proof", write=not args.no_results):
        print(f"L2 bound {args.bound} (float) = sum of squares <= "
              f"{quantized_bound(args.bound, CLIPPING_RANGE, QUANTIZATION_RANGE):,} (quantized: "
              f"clip {CLIPPING_RANGE}, range {QUANTIZATION_RANGE}); input {args.visibility}; "
              f"{args.inner_cols} columns per row; {os.cpu_count()} CPUs; SRS generated locally "
              "(measurement only)")
        print(table(rows))


if __name__ == "__main__":
    main()
