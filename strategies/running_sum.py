"""A weighted sum of model updates, folded in one at a time: the weighted average's accumulator.

`RunningWeightedSum.add` checks an update (number, shapes and dtypes of its arrays against
the reference model, every value finite) before folding `weight * update` into the sum, so
a rejected update leaves the sum exactly as it was. Each update is read twice at most (a
dot product for the finiteness check, then the fold), never copied: it may be the
zero-copy view `strategies.decoding.decode` makes of Flower's bytes, and it can be dropped
as soon as it is added (a server loop may fold each reply as it arrives).

float32 arrays (every Keras model's weights) are summed in float32 with BLAS `saxpy`, as
Flower's `aggregate` sums them; arrays of any other dtype in float64. `result()` divides by
the total weight and returns each array in its reference dtype. The check and the fold run
on one BLAS thread (`strategies.blas.one_blas_thread`).
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np
from flwr.common import NDArrays
from scipy.linalg.blas import saxpy

from strategies.blas import one_blas_thread
from strategies.validation import arrays_problem, claim_cap


def _check_weight(weight: float) -> None:
    """Raise ValueError unless `weight` is a positive finite number."""
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"an update's weight must be positive and finite, got {weight!r}")


def _accumulator(reference: np.ndarray) -> np.ndarray:
    """A flat zero sum for arrays like `reference` (float32 stays float32, else float64)."""
    dtype = np.float32 if reference.dtype == np.float32 else np.float64
    return np.zeros(reference.size, dtype=dtype)


class RunningWeightedSum:
    """Σ weight · update over the updates added so far, and Σ weight.

    Args:
        reference: the arrays every update must match in number, shape and dtype (the
            global model sent this round).
    """

    def __init__(self, reference: NDArrays) -> None:
        self.reference = reference
        self._sums = [_accumulator(np.asarray(r)) for r in reference]
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: NDArrays, weight: float) -> str | None:
        """Fold `weight * arrays` into the sum; or, when `arrays` do not match the
        reference or hold a NaN or infinite value, return why, leaving the sum untouched.

        Raises ValueError if `weight` is not a positive finite number.
        """
        _check_weight(weight)
        with one_blas_thread():
            problem = self.problem(arrays)
            if problem is None:
                self.fold(arrays, weight)
        return problem

    def problem(self, arrays: NDArrays) -> str | None:
        """Why `arrays` cannot be added (`add`'s checks), or None; reads every value once."""
        return arrays_problem(arrays, self.reference)

    def fold(self, arrays: NDArrays, weight: float) -> None:
        """Fold `weight * arrays` into the sum without `add`'s checks: for arrays that
        passed `problem` already.

        Raises ValueError if `weight` is not a positive finite number.
        """
        _check_weight(weight)
        with one_blas_thread():
            for total, array in zip(self._sums, arrays):
                flat = array.reshape(-1)
                if total.dtype == np.float32:
                    saxpy(flat, total, a=weight)  # in place: total += weight * flat
                else:
                    total += flat.astype(np.float64) * weight
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> NDArrays | None:
        """The weighted average of the updates added, each array in its reference dtype and
        shape (None before any update was added)."""
        if not self.count:
            return None
        return [(total / np.asarray(self.total_weight, dtype=total.dtype))
                .astype(ref.dtype, copy=False).reshape(ref.shape)
                for total, ref in zip(self._sums, self.reference)]


class CappedWeightedSum:
    """Σ min(claim, cap) · update, the cap `claim_cap` puts on the round's claims, holding
    at most `hold` updates unfolded: the running sum of a round whose replies are folded as
    they arrive while the `examples-cap-factor` rule needs every claim.

    The cap is `factor` x the lower median of every accepted claim, known only once the
    round's last reply is in. So the `hold` updates with the largest claims so far stay
    unfolded (views of their replies' bytes); when one more arrives, the held update with
    the smallest claim (the earliest of equal claims) is folded with weight
    min(claim, the cap of the claims accepted so far). `finish` folds the held ones, in
    the order they arrived, with min(claim, the round's cap). An update folded early thus
    has its exact weight whenever its claim is within the round's final cap, in
    particular whenever at most `hold` accepted claims exceed it (`exact` says whether
    every weight was exact; a streamed round that is not keeps the previous global model,
    `strategies.validated.ValidatedFitStream.finish`). With `factor` 0 nothing is capped or
    held: each update is checked, then folded at once.

    Args:
        reference: the global model sent this round (see `RunningWeightedSum`).
        factor: the `examples-cap-factor` (0: no cap).
        hold: most updates kept unfolded (>= 0).
    """

    def __init__(self, reference: NDArrays, factor: float, hold: int) -> None:
        self.total = RunningWeightedSum(reference)
        self.factor = factor
        self.hold = hold
        self.claims: list[int] = []  # every accepted claim, in ascending order
        self._held: list[tuple[int, int, NDArrays]] = []  # heap of (claim, arrival, arrays)
        self._early: list[tuple[int, float]] = []  # (claim, weight) of updates folded early

    def add(self, arrays: NDArrays, claim: int) -> str | None:
        """Accept the update and its claimed `num_examples` (a positive integer), holding or
        folding it; or return why `arrays` are rejected (`RunningWeightedSum.add`'s checks),
        leaving the sum and the claims untouched."""
        with one_blas_thread():
            problem = self.total.problem(arrays)
            if problem is None:
                self.take(arrays, claim)
        return problem

    def take(self, arrays: NDArrays, claim: int) -> None:
        """`add` for arrays that passed `RunningWeightedSum.problem` already (they are not
        checked again). Raises ValueError, taking nothing, if `claim` is not a positive
        finite number."""
        _check_weight(claim)
        bisect.insort(self.claims, claim)  # the cap reads their median, never sorts
        if not self.factor:
            self.total.fold(arrays, claim)
            return
        heapq.heappush(self._held, (claim, len(self.claims), arrays))  # (.., arrival, ..)
        if len(self._held) > self.hold:
            early, _, arrays = heapq.heappop(self._held)
            weight = min(early, self._cap())
            self.total.fold(arrays, weight)
            self._early.append((early, weight))

    def cap(self) -> int | None:
        """The cap on the claims accepted so far (None without a factor or a claim)."""
        return claim_cap(self.claims, self.factor, is_sorted=True)

    def _cap(self) -> int:
        """`cap()` where the sum has claims (an update is held or folded)."""
        cap = self.cap()
        if cap is None:
            raise RuntimeError("CappedWeightedSum: no cap, though it holds claims "
                               f"(factor {self.factor}, {len(self.claims)} claims)")
        return cap

    @property
    def exact(self) -> bool:
        """Whether every update folded early got the weight the round's cap gives it."""
        if not self._early:
            return True
        cap = self._cap()
        return all(weight == min(claim, cap) for claim, weight in self._early)

    def finish(self) -> RunningWeightedSum:
        """Fold the held updates with the round's cap; the sum of the round."""
        cap = self.cap()
        for claim, _, arrays in sorted(self._held, key=lambda held: held[1]):
            self.total.fold(arrays, claim if cap is None else min(claim, cap))
        self._held.clear()
        return self.total
