"""Choose every device's split point (and step option): the policies, a pure function.

A policy decides over a `Problem`, or the same figures as arrays (`ProblemArrays`, which the
controller reads from telemetry without an object per device), and its cost model
(ares.core.costmodel: the predicted time and energy of every device at every split and option).
`choose` gives one split per device (vectorised with numpy over devices x columns, a block of
devices at a time: `blocks`), `choose_columns` the (mode, option, split) `Column` of each, and
`decide` a `Plan` with the cost model's predictions for them. Weighting and normalising are
module functions (`weighted_cost`, `row_norm`), tested on their own.
`parse_policy` turns a policy's name into one; `oracle_round_time` is the best round any
choice could give.

Policies (all respect a device's `pinned_split`):
- `ares`: the published rule, per device, over all splits and per iteration:
  s* = argmin_s  a * T(s)/||T||2 + (1 - a) * E(s)/||E||2   (a = time weight, norms over s).
- `straggler`: first the best achievable round time R* (min over joint split vectors of the
  slowest device's round time); then every device picks, among its splits whose round time
  stays <= R*, the one minimising the same weighted objective on *round* time and energy
  (default a = 0: least energy). With `share_server=True` the server's compute is shared
  by all offloading devices (split < L-1): server_s is multiplied by their number k
  (processor sharing with every offloader busy at once: a pessimistic approximation). R*
  is then found exactly by trying, for m = 0..N, the m devices with the slowest on-device
  round as the offloaders. The splits are then chosen jointly: for every count k of
  offloaders, each device's best offload column with the server shared k ways and round
  <= R*; the devices that must offload (on-device round > R*) plus the k - forced others
  whose offloading saves the most are the offloaders; the k with the least total is kept.
  With server shards (`DeviceInput.shard`) each shard's server is shared by its own
  offloaders: R* is the slowest shard's best, and every shard spends its slack below it.
  The total is the sum over devices of their own weighted objective in joules
  (||E||2 * objective; at a = 0 exactly the fleet's energy), so with the default weight the
  plan is the least-energy one among those with the best round time. O(N^2 * L) in the worst
  case (every device gains by offloading): about a second for 2,000 devices.
- `fixed:N` and `none` (= split L-1, all layers on the device) are the baselines.

Power modes. Where devices list other power modes (`DeviceInput.modes`) the columns run over
(mode, option, split) and every policy chooses among them as among splits: `straggler` keeps the
round time the fleet would have with every device at its fastest setting and spends each
device's slack on the mode and setting of least energy; `ares` weighs time and energy across
modes too. A policy weighs every round's costs (`steady`: without a switch's one-off pause);
a device leaves the mode in force only for a cost at least `MODE_MARGIN` (10%) below its best
there; the plan predicts the round that starts in a new mode with the pause.

Staying put. `ares` and `straggler` (unshared) keep a device at the column it runs now
(`DeviceInput.current`) while that column is allowed (for `straggler`: keeps the round) and its
cost is within `STAY_MARGIN` (10%) of the best one. Every move costs a round predicted from
older figures, and on near-ties the choice otherwise followed the noise of the estimates: in
`ares bench paper5 --duplex half` two Nanos with slack moved between split 1 and split 3 in
7 of 9 rounds, for energy differences of 2-10%, and each move was mispredicted by up to 46%.
The round time is never given up for it; a real change (a power mode, a link that falls)
moves costs far more than 10%.

A policy only chooses columns; `decide` turns them into a `Plan` through the same cost model
(`plan_columns`) that `evaluate` applies to any assignment, so the predictions of every policy
are comparable.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Protocol

import numpy as np

from ares.core.costmodel import (Column, CostInputs, Plan, Problem, ProblemArrays, check_alpha, check_split,
                                 cost_matrices, plan_columns)


class SplitPolicy(Protocol):
    name: str

    def decide(self, problem: Problem | ProblemArrays) -> Plan: ...

    def choose(self, problem: Problem | ProblemArrays) -> np.ndarray: ...



def _scaled(v: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row divided by its largest magnitude (valid columns only, others 0), and that maximum."""
    v = np.where(valid, v, 0.0) if valid is not None else np.asarray(v, dtype=float)
    if not np.isfinite(v).all():
        raise ValueError("weighted_cost: times and energies must be finite (an inf or nan has no ranking)")
    top = np.abs(v).max(axis=1, keepdims=True)
    return np.divide(v, top, out=np.zeros_like(v, dtype=float), where=top > 0), top


def row_norm(v: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """||row||2 over the valid columns, (N, 1), without squaring large values (no overflow)."""
    scaled, top = _scaled(v, valid)
    return top * np.linalg.norm(scaled, axis=1, keepdims=True)


def weighted_cost(time: np.ndarray, energy: np.ndarray, alpha: np.ndarray,
                  valid: np.ndarray | None = None) -> np.ndarray:
    """Row by row: alpha * T/||T||2 + (1 - alpha) * E/||E||2 (norms over the row's valid columns);
    a zero row adds 0. Norms are taken on values scaled by the row's maximum, so no square
    overflows; an inf or nan among the valid values is refused (it would rank as garbage). A term
    weighted 0 on every row is left out, its values unread: it would add exactly 0 (the straggler
    policy's default, a = 0, is the energy alone)."""
    def normalised(v: np.ndarray) -> np.ndarray:
        scaled, _ = _scaled(v, valid)
        norm = np.linalg.norm(scaled, axis=1, keepdims=True)
        return np.divide(scaled, norm, out=np.zeros_like(scaled), where=norm > 0)

    a = np.asarray(alpha, dtype=float).reshape(-1, 1)
    if not a.any():
        return normalised(energy)
    if (a == 1).all():
        return normalised(time)
    return a * normalised(time) + (1 - a) * normalised(energy)



def _alphas(p: ProblemArrays, default: float) -> np.ndarray:
    return np.where(np.isnan(p.alpha), default, p.alpha)


def _argmin_where(cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Column of the smallest cost among the allowed ones, per row (ties: the lowest column)."""
    return np.where(mask, cost, np.inf).argmin(axis=1)


STAY_MARGIN = 0.10  # a device moves only for a cost at least 10% below its current column's
MODE_MARGIN = 0.10  # a device switches power mode only for a cost at least 10% below its best in the mode in force
# A device slowed to spend its slack (a mode slower than its fastest) must finish 15% inside the round:
# predictions of a setting not yet run are off by up to that much, and a slowed device that overran
# would become the straggler.
SLOW_HEADROOM = 0.15


def noise_headroom(noise: float, n_devices: int) -> float:
    """The share of the round a device sent to a slower setting (to spend its slack) must leave
    free, so that the round's own draw does not make it the straggler: with each device's time
    moving by a lognormal `noise` from round to round, the largest of `n_devices` draws is about
    sigma x z above its mean, z the normal quantile at 1 - 1/(n + 1) (1.0 at 5 devices, 3.1 at
    1,000, 3.7 at 10,000). In `ares simulate` with its default jitter, slack spent up to the round's
    very edge made the straggler policy 5.7% slower than its oracle at 1,000 devices (2.2% slower
    than running every layer on the device); with this headroom, 1.0x. At most a half."""
    if noise <= 0 or n_devices < 1:
        return 0.0
    z = statistics.NormalDist().inv_cdf(1 - 1 / (n_devices + 1))
    return min(0.5, 1 - math.exp(-noise * z))


def slowed_columns(p: ProblemArrays, x: CostInputs) -> np.ndarray:
    """(N, C): the columns in a mode whose device part at that split is slower than in the device's
    fastest mode (its valid modes only)."""
    n, n_modes, s = x.fwd.shape
    compute = x.fwd + x.bwd
    own = np.arange(n_modes)[None, :, None] < p.mode_counts[:, None, None]
    fastest = np.where(own, compute, np.inf).min(axis=1, keepdims=True)
    slowed = compute > fastest * (1 + 1e-9)
    n_opt = len(p.options)
    return np.broadcast_to(slowed[:, :, None, :], (n, n_modes, n_opt, s)).reshape(n, n_modes * n_opt * s)


def _keep_mode(p: ProblemArrays, cost: np.ndarray, mask: np.ndarray, best: np.ndarray, margin: float) -> np.ndarray:
    """`best`, except that a device stays in the mode in force while its best column there is
    allowed and costs at most `margin` more than `best` (costs are >= 0)."""
    if p.n_modes == 1:
        return best
    here = mask & (p.column_modes() == 0)[None, :]
    best_here = _argmin_where(cost, here)
    rows = np.arange(len(best))
    keep = here.any(axis=1) & (cost[rows, best_here] <= cost[rows, best] * (1 + margin))
    return np.where(keep, best_here, best)


def _stay_or_move(p: ProblemArrays, cost: np.ndarray, mask: np.ndarray, mode_margin: float = MODE_MARGIN) -> np.ndarray:
    """The best allowed column per row, except that a device stays in its power mode while the
    best there costs at most `mode_margin` more, and keeps its current column while that is
    allowed and costs at most `STAY_MARGIN` more than the best (costs are >= 0)."""
    best = _keep_mode(p, cost, mask, _argmin_where(cost, mask), mode_margin)
    rows = np.flatnonzero(p.current >= 0)
    if rows.size:
        current = p.current[rows]
        keep = mask[rows, current] & (cost[rows, current] <= cost[rows, best[rows]] * (1 + STAY_MARGIN))
        best[rows[keep]] = current[keep]
    return best



# A block of devices at a time. The policies that choose for each device on its own (all but the
# shared-server straggler) go through the fleet in blocks of devices with the same number of power
# modes, each block's matrices with only those modes' columns and about BLOCK_CELLS cells (1 MB of
# floats): a block's matrices stay in the processor's cache between the passes over them, and a Pi
# beside Jetsons has no padded mode columns to compute. At 10,000 devices, half of them Jetsons with
# 4 modes x 6 options x 7 splits, the cost model took a quarter of the CPU time this way that it
# took over the whole fleet at once (34 against 135 ms, a loaded 2-core machine).
BLOCK_CELLS = 1 << 17


def blocks(p: ProblemArrays) -> list[tuple[np.ndarray, ProblemArrays]]:
    """(rows, those devices alone with their own power modes' columns) for every block of `p`."""
    out = []
    for m in np.unique(p.mode_counts).tolist():
        idx = np.flatnonzero(p.mode_counts == m)
        size = max(1, BLOCK_CELLS // (m * len(p.options) * p.n_splits))
        for lo in range(0, len(idx), size):
            rows = idx[lo:lo + size]
            out.append((rows, p if len(rows) == len(p.names) and m == p.n_modes else p.rows(rows, m)))
    return out


def _by_block(p: ProblemArrays, choose: Callable[[ProblemArrays], np.ndarray]) -> np.ndarray:
    """Every device's column, chosen block by block (`blocks`)."""
    cols = np.empty(len(p.names), dtype=int)
    for rows, q in blocks(p):
        cols[rows] = choose(q)
    return cols


# ---- policies: each only chooses columns; `_Chooser.decide` turns them into a plan -------------

def _arrays(problem: Problem | ProblemArrays) -> ProblemArrays:
    return problem if isinstance(problem, ProblemArrays) else problem.arrays()


class _Chooser:
    """Shared `decide` and `choose` for policies that implement `_choose(p)`, over the costs a policy
    weighs (`steady`). Each takes a `Problem` or, made without an object per device (the
    controller's), its `ProblemArrays`."""

    name: str
    shares_server: bool = False

    def _choose(self, p: ProblemArrays) -> np.ndarray:
        raise NotImplementedError

    def choose_columns(self, problem: Problem | ProblemArrays) -> list[Column]:
        """The (mode, option, split) column of every device, in the problem's order."""
        p = _arrays(problem)
        s, o = p.n_splits, len(p.options)
        return [Column.at(c, s, o) for c in self._choose(steady(p)).tolist()]

    def choose(self, problem: Problem | ProblemArrays) -> np.ndarray:
        """Just the split of every device, in the problem's order (no plan objects built)."""
        p = _arrays(problem)
        return self._choose(steady(p)) % p.n_splits

    def decide(self, problem: Problem | ProblemArrays) -> Plan:
        p = _arrays(problem)
        return plan_columns(p, self._choose(steady(p)), self.name, self.shares_server)


def steady(p: ProblemArrays) -> ProblemArrays:
    """The costs a policy weighs: every round's, without a mode switch's one-off pause (a switch
    pays once, the mode's gain or loss recurs every round; `MODE_MARGIN` keeps near-ties from
    switching). The plan still predicts the round that starts in a new mode with its pause."""
    return replace(p, x=replace(p.x, switch=None)) if p.x.switch is not None else p


@dataclass(frozen=True)
class AresPolicy(_Chooser):
    """The published ARES rule: per device, least weighted per-iteration time and energy (over its
    power modes too, where it has them)."""

    alpha: float = 0.5
    mode_margin: float = MODE_MARGIN
    name: ClassVar[str] = "ares"

    def __post_init__(self) -> None:
        check_alpha(self.alpha)

    def _choose(self, p: ProblemArrays) -> np.ndarray:
        return _by_block(p, self._choose_block)

    def _choose_block(self, p: ProblemArrays) -> np.ndarray:
        c = cost_matrices(p.x)
        cost = weighted_cost(c.iteration_s, c.energy_iteration_j, _alphas(p, self.alpha), p.valid)
        return _stay_or_move(p, cost, p.allowed(), self.mode_margin)


@dataclass(frozen=True)
class StragglerPolicy(_Chooser):
    """Keep the best achievable round time; spend every device's slack on its own preference."""

    alpha: float = 0.0  # default: pure energy among round-preserving splits
    share_server: bool = False
    mode_margin: float = MODE_MARGIN
    headroom: float = SLOW_HEADROOM  # unshared: a slowed device's round stays within (1 - headroom) x the round
    name: ClassVar[str] = "straggler"

    def __post_init__(self) -> None:
        check_alpha(self.alpha)

    @property
    def shares_server(self) -> bool:  # type: ignore[override]
        return self.share_server

    def _choose(self, p: ProblemArrays) -> np.ndarray:
        if self.share_server:
            return self._shared(p)
        parts = [(rows, q, q.allowed(), cost_matrices(q.x)) for rows, q in blocks(p)]
        # the best round any joint choice gives: every device at its fastest, the slowest of them
        target = max(float(np.where(allowed, c.round_s, np.inf).min(axis=1).max()) for _, _, allowed, c in parts)
        spare = noise_headroom(p.noise, len(p.names))
        cols = np.empty(len(p.names), dtype=int)
        for rows, q, allowed, c in parts:
            cols[rows] = self._spend_slack(q, allowed, c.round_s, c.energy_round_j, target, spare)
        return cols

    def _spend_slack(self, p: ProblemArrays, allowed: np.ndarray, round_s: np.ndarray, energy: np.ndarray,
                     target: float, spare: float = 0.0) -> np.ndarray:
        """Each device's preferred column among those that keep the round within `target`; a column
        slower than the device's fastest only within (1 - `spare`) x `target` (`noise_headroom`)."""
        feasible = allowed & (round_s <= target)
        if spare:
            fastest = np.where(allowed, round_s, np.inf).min(axis=1, keepdims=True)
            feasible &= (round_s <= target * (1 - spare)) | (round_s <= fastest)
        if p.n_modes > 1 and self.headroom:
            feasible &= ~slowed_columns(p, p.x) | (round_s <= target * (1 - max(self.headroom, spare)))
        alphas = _alphas(p, self.alpha)
        # With a = 0 on every row (the default) the objective is E/||E||2: per row a positive factor
        # times the energy, which neither the ranking nor the margins (ratios) see; the energy itself
        # (finite: `cost_matrices` refuses any other) spares ten passes over the matrices.
        cost = weighted_cost(round_s, energy, alphas, p.valid) if alphas.any() else energy
        return _stay_or_move(p, cost, feasible, self.mode_margin)

    def _shared(self, p: ProblemArrays) -> np.ndarray:
        """The shared-server choice (`_shared_choice`), shard by shard: a shard's offloaders share its
        server, and the round is the slowest shard's. Every shard keeps the best round the slowest
        one can reach, and spends its own slack below it."""
        x, allowed, s, alphas = p.x, p.allowed(), p.n_splits, _alphas(p, self.alpha)
        shards = p.shards()
        if len(shards) == 1:
            cols = _shared_choice(x, allowed, s, alphas, p.valid)
        else:
            bests = [_shared_target(x.rows(rows), allowed[rows], s) for rows in shards]
            target = max(best for best, _ in bests)
            cols = np.empty(len(p.names), dtype=int)
            for rows, best in zip(shards, bests):
                cols[rows] = _shared_choice(x.rows(rows), allowed[rows], s, alphas[rows], p.valid[rows], target, best)
        if p.n_modes == 1:
            return cols
        # the mode in force where it costs at most the margin more, with the same split and option
        # (the same sharing: its round and energy change with the mode alone)
        c = cost_matrices(x, p.server_share(cols))
        rows, width = np.arange(len(cols)), len(p.options) * s
        target = c.round_s[rows, cols].max()
        here = cols % width
        ok = allowed[rows, here] & (c.round_s[rows, here] <= target) & (
            c.energy_round_j[rows, here] <= c.energy_round_j[rows, cols] * (1 + self.mode_margin))
        return np.where(ok, here, cols)


def _shared_target(x: CostInputs, allowed: np.ndarray, s: int) -> tuple[float, np.ndarray]:
    """Best round time when the server is shared, and the devices that offload to reach it.

    Any optimal vector with round time t must offload every device whose on-device round exceeds
    t, and offloading only those is never slower (less sharing). So the optimum is among the
    prefixes of the devices sorted by on-device round time, slowest first; try each prefix size m
    with the server shared m ways. Offload times only grow with m, which allows stopping early.
    """
    n, local = allowed.shape[0], np.arange(allowed.shape[1]) % s == s - 1  # the last split, in every mode
    off = ~local
    on_device = np.where(allowed & local, cost_matrices(x).round_s, np.inf).min(axis=1)
    can_offload = (allowed & off).any(axis=1)
    order = np.argsort(-on_device, kind="stable")
    best_t, best_m = math.inf, 0
    for m in range(n + 1):
        rest = on_device[order[m]] if m < n else 0.0
        slowest_offloader = 0.0
        if m:
            rows = order[:m]
            if not can_offload[rows[-1]]:
                break
            r = cost_matrices(x.rows(rows), float(m)).round_s
            slowest_offloader = np.where(allowed[rows] & off, r, np.inf).min(axis=1).max()
            if slowest_offloader >= best_t:
                break
        t = max(rest, slowest_offloader)
        if t < best_t:
            best_t, best_m = t, m
    offloaders = np.zeros(n, dtype=bool)
    offloaders[order[:best_m]] = True
    return float(best_t), offloaders


def _shared_choice(x: CostInputs, allowed: np.ndarray, s: int, alphas: np.ndarray, valid: np.ndarray,
                   target: float | None = None, best: tuple[float, np.ndarray] | None = None) -> np.ndarray:
    """Columns of the plan with the best shared-server round time (or, given, a `target` no better
    than it: another shard's) and the least total objective. `best`: `_shared_target` of these
    devices, where the caller has it already.

    Energy does not depend on how many devices share the server; round times only grow with
    that count k. So for each k: a device must offload if its on-device round misses R*, may
    offload if some offload column keeps R* with the server shared k ways, and the k - forced
    optional offloaders are those that save the most. Stops once fewer than k devices can
    offload, or once every device that would save is offloading: a larger k then only removes
    choices (exact for a = 0, where the scores do not depend on k).
    """
    best_s, offloaders = best or _shared_target(x, allowed, s)
    target = best_s if target is None else max(target, best_s)
    local_cols = np.arange(allowed.shape[1]) % s == s - 1  # the last split, in every power mode
    off = ~local_cols
    c_all = cost_matrices(x)
    on_device_ok = allowed & local_cols & (c_all.round_s <= target)
    # every device not offloading runs at its best last-split column that keeps the round
    cols = _argmin_where(weighted_cost(c_all.round_s, c_all.energy_round_j, alphas, valid) * row_norm(
        c_all.energy_round_j, valid), on_device_ok | (allowed & local_cols & ~on_device_ok.any(axis=1, keepdims=True)))
    cand = np.flatnonzero((allowed & off).any(axis=1))  # the only devices that may offload (the rest: local)
    xc, allowed_c, alphas_c, valid_c = x.rows(cand), allowed[cand], alphas[cand], valid[cand]
    c = cost_matrices(xc)
    local_mask = allowed_c & local_cols & (c.round_s <= target)
    local_ok = local_mask.any(axis=1)
    forced = ~local_ok
    n_forced, rows = int(forced.sum()), np.arange(len(cand))
    most = _most_sharers(xc, allowed_c & off, target, len(cand))
    energy_only = not alphas_c.any()  # a = 0: the score is the energy, the same for every k
    best_total, best_cols = math.inf, None
    for k in range(n_forced, len(cand) + 1):
        feasible = most >= max(k, 1) if k else np.zeros_like(allowed_c)
        can_off = feasible.any(axis=1)
        if (forced & ~can_off).any() or can_off.sum() < k:
            break
        if energy_only:
            score = c.energy_round_j
        else:
            ck = cost_matrices(xc, float(max(k, 1)))
            score = (weighted_cost(ck.round_s, ck.energy_round_j, alphas_c, valid_c)
                     * row_norm(ck.energy_round_j, valid_c))
        col_off = np.where(feasible, score, np.inf).argmin(axis=1)
        score_off = score[rows, col_off]
        col_local = _argmin_where(score, local_mask)
        score_local = np.where(local_ok, score[rows, col_local], np.inf)
        gain = np.where(local_ok & can_off, score_local - score_off, -np.inf)
        chosen = forced.copy()
        slots = k - n_forced
        if slots:
            top = np.argpartition(-gain, slots - 1)[:slots] if slots < len(gain) else rows
            chosen[top[gain[top] > 0]] = True
        total = float(np.where(chosen, score_off, score_local).sum())
        if total < best_total:
            best_total, best_cols = total, np.where(chosen, col_off, col_local)
        if k and slots >= np.count_nonzero(gain > 0):
            break  # every saving taken: a larger k only removes choices (exact at a = 0)
    if best_cols is None:  # not reached when the arithmetic is exact; the prefix plan is still valid
        c = cost_matrices(x, float(offloaders.sum()))
        allowed = allowed.copy()
        allowed[np.ix_(~offloaders, off)] = False
        cost = weighted_cost(c.round_s, c.energy_round_j, alphas, valid)
        return _argmin_where(cost, allowed & (c.round_s <= target))
    cols[cand] = best_cols
    return cols


def _most_sharers(x: CostInputs, mask: np.ndarray, target: float, n: int) -> np.ndarray:
    """Per cell in `mask`, the largest k <= n with the round time, server shared k ways, still <= target
    (0: not even alone). Round times only grow with k, so a bisection per cell: ~log2(n) cost evaluations."""
    lo, hi = np.zeros(mask.shape, dtype=np.int64), np.where(mask, n, 0)
    while (open_ := lo < hi).any():
        mid = np.where(open_, (lo + hi + 1) // 2, 1)
        ok = cost_matrices(x, mid.astype(float)).round_s <= target
        lo, hi = np.where(open_ & ok, mid, lo), np.where(open_ & ~ok, mid - 1, hi)
    return lo


@dataclass(frozen=True)
class FixedPolicy(_Chooser):
    """The same split for every device that is not pinned (a baseline), with the first option."""

    split: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"fixed:{self.split}"

    def _choose(self, p: ProblemArrays) -> np.ndarray:
        s = check_split(self.split, p.n_splits, "fixed split")
        return np.where(p.pinned_split >= 0, p.pinned_split, s)


@dataclass(frozen=True)
class NonePolicy(_Chooser):
    """Every layer on the device (split L-1): plain federated learning, the baseline to beat."""

    name: ClassVar[str] = "none"

    def _choose(self, p: ProblemArrays) -> np.ndarray:
        return FixedPolicy(p.n_splits - 1)._choose(p)


POLICY_NAMES = ("ares", "straggler", "fixed:N", "none")


def parse_policy(text: str, alpha: float | None = None, share_server: bool = False) -> SplitPolicy:
    """"ares", "straggler", "fixed:3" or "none"; `alpha` overrides the policy's default time weight.
    `share_server` only means something to straggler: with any other policy it is refused, not ignored."""
    key = text.strip().lower()
    if share_server and key != "straggler":
        raise ValueError(f"share_server (--share-server) models a shared server for the straggler policy only, "
                         f"not policy {text!r}")
    if key == "ares":
        return AresPolicy() if alpha is None else AresPolicy(alpha)
    if key == "straggler":
        return StragglerPolicy(0.0 if alpha is None else alpha, share_server)
    if key == "none":
        return NonePolicy()
    if key.startswith("fixed:") and key[6:].isdigit():
        return FixedPolicy(int(key[6:]))
    raise ValueError(f"unknown policy {text!r}; accepted: {', '.join(POLICY_NAMES)} (N = a split point)")


def oracle_round_time(problem: Problem | ProblemArrays, share_server: bool = False, max_vectors: int = 1_000_000) -> float:
    """Best round time over all joint choices of split and option (pins and options respected).

    Without server sharing each device's round time depends only on its own choice, so the
    optimum is exactly max over devices of min over its columns. With sharing it is found by
    enumerating every joint vector (refused beyond `max_vectors`).
    """
    p = _arrays(problem)
    allowed = p.allowed()
    if not share_server:
        return float(np.where(allowed, cost_matrices(p.x).round_s, np.inf).min(axis=1).max())
    choices = [np.flatnonzero(row).tolist() for row in allowed]
    count = math.prod(len(c) for c in choices)
    if count > max_vectors:
        raise ValueError(f"{count} joint choices exceed max_vectors={max_vectors}")
    return min(plan_columns(p, np.array(v), "oracle", True).round_s for v in itertools.product(*choices))

