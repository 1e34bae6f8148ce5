"""The executor's form of a StepPlan: carry only the latents that the rest of the plan needs.

In canonical form every row of a classic solver touches every column, so running it directly
would keep all N+1 basis latents. But after call k the future rows only need the part of the
past that lies in

    V_k = rowspace(coef[k+1:, :k+2])      (rows k+1..N, restricted to columns 0..k+1)

and its dimension r_k is small for classic solvers (DDIM 1, a 2nd-order multistep solver 2,
UniPC with corrector 3) while a fitted OLSS plan may need all of it. The compiler below tracks
a set of slots that span V_k (r_k of them when the greedy choices below suffice) and emits, per
call, a short program of elementwise linear combinations:

- old carried latents that still lie in V_k are kept as they are (no data moves);
- the new direction contributed by call k is formed from (x^(k), out_k) in place of out_k's
  slot, e.g. x̂_0 = (x − σ·ε̂)/α for a data-prediction solver with an ε model;
- the next model input x^(k+1) is written over x^(k);
- only if that does not cover V_k, further latents are kept whole (never recombined), so the
  program stays as well conditioned in float32 as the scheduler loop it reproduces.

Every slot is a known coefficient vector over the canonical basis, so the compiled program is
re-expanded symbolically and compared with ``coef``; ``max_error`` reports the difference
(float64 rounding for classic solvers) and compilation fails if it exceeds the tolerance.
Subspaces are found backwards in O(N²·r²) time, so 1000-step teacher plans compile quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

X_T_SLOT = 0  # slot 0 always holds the caller's x_T, which is never written

RANK_TOL = 1e-9  # relative singular-value threshold for "this direction carries no weight"
EXPRESS_TOL = 1e-10  # relative residual accepted when writing a vector over available slots
VERIFY_TOL = 1e-8  # relative error of the re-expanded plan above which compilation fails
AMPLIFICATION_LIMIT = 8.0  # an op magnifying rounding more than this triggers the whole-latent choice


@dataclass(frozen=True)
class LinOp:
    """slot[dst] = Σ coefs[i]·slot[srcs[i]], elementwise (dst may be among srcs)."""

    dst: int
    srcs: tuple[int, ...]
    coefs: tuple[float, ...]


@dataclass(frozen=True)
class RecurrentStep:
    """One model call: run the model on slot ``input_slot``, put its output in ``output_slot``,
    run ``ops`` in order, then free the slots in ``release``. ``next_slot`` then holds the next
    model input (the result after the last call)."""

    input_slot: int
    output_slot: int
    ops: tuple[LinOp, ...]
    release: tuple[int, ...]
    next_slot: int


@dataclass(frozen=True)
class RecurrentPlan:
    init: LinOp  # first model input from x_T
    steps: tuple[RecurrentStep, ...]
    result_slot: int
    num_slots: int  # slot ids used, x_T's slot 0 included
    peak_latents: int  # most executor-owned latents alive at once, model output included
    carried: tuple[int, ...]  # latents carried from call k to call k+1 (>= dim V_k)
    max_error: float  # max |coef - re-expanded coef| relative to max |coef|

    @property
    def num_ops(self) -> int:
        return sum(len(s.ops) for s in self.steps)


class CompileError(ValueError):
    """The plan cannot be turned into a recurrent program accurately (should not happen)."""


def _future_subspaces(coef: np.ndarray) -> list[np.ndarray]:
    """Orthonormal row bases of V_k for k = 0..N-1, each padded to the full basis width.

    Working backwards, V_k is spanned by row k+1 and the rows that spanned V_{k+1}, restricted
    to one column fewer; a row that is dependent at level k stays dependent at every earlier
    level, so a pivoted QR over at most r+1 original rows per level selects a spanning set.
    Each level is computed from the exact rows (never from the previous level's basis), so
    rounding does not accumulate from level to level.
    """
    from scipy.linalg import qr

    n = coef.shape[0] - 1
    width = n + 1
    bases: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    selected: list[int] = []
    row_scale = np.linalg.norm(coef, axis=1)
    for k in range(n - 1, -1, -1):
        candidates = [k + 1] + selected
        # Scale by the whole row's norm, not the restricted part's: a part that is only float64
        # rounding (e.g. x − (x/σ)·σ left over from an exact cancellation) must stay negligible.
        rows = coef[candidates, : k + 2] / np.maximum(row_scale[candidates], 1e-300)[:, None]
        padded = np.zeros((0, width))
        selected = []
        if np.any(rows):
            q, r, piv = qr(rows.T, mode="economic", pivoting=True)
            diag = np.abs(np.diag(r))
            rank = int(np.sum(diag > RANK_TOL))
            selected = [candidates[p] for p in piv[:rank]]
            padded = np.zeros((rank, width))
            padded[:, : k + 2] = q[:, :rank].T
        bases[k] = padded
    return bases


def _rank(vectors: list[np.ndarray]) -> int:
    if not vectors:
        return 0
    m = np.vstack([v / max(np.linalg.norm(v), 1e-300) for v in vectors])
    s = np.linalg.svd(m, compute_uv=False)
    return int(np.sum(s > RANK_TOL * max(s[0], 1e-300)))


def _express(target: np.ndarray, slots: list[int], vec: dict[int, np.ndarray]):
    """(slots, coefs) writing target over the given slots with as few terms as possible, or None."""
    tol = EXPRESS_TOL * max(1.0, np.linalg.norm(target))

    def solve(chosen: list[int]):
        a = np.column_stack([vec[s] for s in chosen])
        c, *_ = np.linalg.lstsq(a, target, rcond=None)
        return c, np.linalg.norm(a @ c - target)

    chosen = list(slots)
    coefs, residual = solve(chosen)
    if residual > tol:
        return None
    # Greedily drop the weakest terms while the representation stays exact.
    while len(chosen) > 1:
        weights = [abs(c) * np.linalg.norm(vec[s]) for c, s in zip(coefs, chosen)]
        for idx in np.argsort(weights):
            trial = chosen[:idx] + chosen[idx + 1 :]
            c, r = solve(trial)
            if r <= tol:
                chosen, coefs = trial, c
                break
        else:
            break
    return chosen, coefs


def _null_directions(q: np.ndarray, x: np.ndarray, out: np.ndarray) -> list[np.ndarray]:
    """(p, q) pairs spanning {p·x + q·out} ∩ rowspace(q) (x is scaled to unit norm first)."""
    nx = np.linalg.norm(x)
    r = np.column_stack([(x - q.T @ (q @ x)) / nx, out - q.T @ (q @ out)])
    _, sv, vt = np.linalg.svd(r, full_matrices=False)
    return [vt[i] * np.array([1.0 / nx, 1.0]) for i in range(2) if sv[i] <= RANK_TOL]


def _select(q, q_next, target, vec, x_slot, out_slot, aux, allow_shift: bool, lookahead: bool):
    """Choose what to carry past a call: (kept old slots, keep x^(k), keep out_k, out_shift)."""

    def residual(v: np.ndarray) -> np.ndarray:
        return v - q.T @ (q @ v)

    def in_v(v: np.ndarray) -> bool:
        return np.linalg.norm(residual(v)) <= RANK_TOL * max(np.linalg.norm(v), 1e-300)

    state = [target]

    def adds(v: np.ndarray) -> bool:
        return _rank(state + [v]) > len(state)

    # 1. Carried latents that still lie in V_k stay where they are.
    keep = []
    for a in aux:
        if in_v(vec[a]) and adds(vec[a]):
            keep.append(a)
            state.append(vec[a])

    # 2. What call k adds: the directions of span{x^(k), out_k} inside V_k (the null space of
    #    their residuals). One direction with an out_k part becomes out_k + shift·x^(k) in
    #    out_k's slot, like a solver converting its prediction; x^(k) itself, or both, are kept.
    nx = np.linalg.norm(vec[x_slot])
    null = _null_directions(q, vec[x_slot], vec[out_slot])
    if len(null) == 2 and lookahead and q_next is not None:
        # Both are needed now; if only one direction of the pair is still needed after the
        # next call, carry that one (the target covers the rest), e.g. a multistep solver's
        # first converted prediction rather than x^(0) and out_0 separately.
        lasting = _null_directions(q_next, vec[x_slot], vec[out_slot])
        if len(lasting) == 1:
            null = lasting
    keep_x = keep_out = False
    out_shift = 0.0
    if len(null) == 2:
        if adds(vec[x_slot]):
            state.append(vec[x_slot])
            keep_x = True
        if adds(vec[out_slot]):
            state.append(vec[out_slot])
            keep_out = True
    elif len(null) == 1:
        p, qq = null[0]
        if abs(qq) > RANK_TOL * (abs(p) * nx + abs(qq)):
            shift = float(p / qq) if abs(p / qq) * nx > RANK_TOL else 0.0
            fresh = vec[out_slot] + shift * vec[x_slot]
            if (allow_shift or shift == 0.0) and adds(fresh):
                state.append(fresh)
                keep_out, out_shift = True, shift
        elif adds(vec[x_slot]):
            state.append(vec[x_slot])
            keep_x = True

    # 3. If V_k is still not covered, keep further latents whole (carried ones not in V_k, then
    #    x^(k), then out_k), each time the one that covers most of what is missing. That costs
    #    memory but never forms combinations of nearly parallel latents.
    def uncovered(vectors: list[np.ndarray]) -> float:
        basis = np.column_stack(vectors)
        coords = np.linalg.lstsq(basis, q.T, rcond=None)[0]
        return float(np.max(np.linalg.norm(q.T - basis @ coords, axis=0), initial=0.0))

    candidates = [a for a in aux if a not in keep]
    if not keep_x:
        candidates.append(x_slot)
    if not keep_out:
        candidates.append(out_slot)
    gap = uncovered(state)
    while gap > RANK_TOL:
        scores = [uncovered(state + [vec[c]]) for c in candidates]
        best = int(np.argmin(scores)) if scores else -1
        if best < 0 or scores[best] >= gap:
            return None
        chosen = candidates.pop(best)
        state.append(vec[chosen])
        gap = scores[best]
        if chosen == x_slot:
            keep_x = True
        elif chosen == out_slot:
            keep_out = True
        else:
            keep.append(chosen)
    return keep, keep_x, keep_out, out_shift


def _amplification(op: LinOp, vec: dict[int, np.ndarray]) -> float:
    """How much an op can magnify relative rounding: Σ|c_i|·|v_i| / |Σ c_i·v_i| (coefficient
    norms stand in for latent magnitudes, since every basis latent is O(1))."""
    total = sum(abs(c) * np.linalg.norm(vec[s]) for s, c in zip(op.srcs, op.coefs))
    result = np.linalg.norm(sum(c * vec[s] for s, c in zip(op.srcs, op.coefs)))
    return float(total / max(result, 1e-300))


def _step_program(target, vec, x_slot, out_slot, aux, choice, next_slot):
    """The ops of one call for a selection, and their worst amplification."""
    _, _, _, out_shift = choice
    local = dict(vec)
    ops: list[LinOp] = []
    if out_shift != 0.0:
        ops.append(LinOp(out_slot, (out_slot, x_slot), (1.0, out_shift)))
        local[out_slot] = vec[out_slot] + out_shift * vec[x_slot]
    expressed = _express(target, [x_slot, out_slot] + aux, local)
    if expressed is None:
        return None
    ops.append(LinOp(next_slot, tuple(expressed[0]), tuple(float(c) for c in expressed[1])))
    amp = max(_amplification(op, local if i else vec) for i, op in enumerate(ops))
    return ops, local, amp


def compile_plan(coef: np.ndarray) -> RecurrentPlan:
    """Derive the recurrent program of a validated canonical coef matrix.

    The greedy choices have one heuristic knob (look one call ahead when both x^(k) and out_k
    are needed); both settings are compiled and the program holding fewer latents wins.
    """
    coef = np.asarray(coef, dtype=np.float64)
    bases = _future_subspaces(coef)
    programs = [_compile(coef, bases, lookahead) for lookahead in (True, False)]
    return min(programs, key=lambda p: (p.peak_latents, sum(p.carried), p.num_ops))


def _unit(width: int, j: int) -> np.ndarray:
    e = np.zeros(width)
    e[j] = 1.0
    return e


def _compile(coef: np.ndarray, bases: list[np.ndarray], lookahead: bool) -> RecurrentPlan:
    n = coef.shape[0] - 1
    width = n + 1

    vec: dict[int, np.ndarray] = {X_T_SLOT: _unit(width, 0)}
    free: list[int] = []
    next_id = [1]

    def alloc() -> int:
        if free:
            return free.pop()
        next_id[0] += 1
        return next_id[0] - 1

    x_slot = alloc()
    vec[x_slot] = coef[0].copy()
    init = LinOp(x_slot, (X_T_SLOT,), (float(coef[0, 0]),))
    aux: list[int] = []
    steps: list[RecurrentStep] = []
    carried: list[int] = []
    peak = 1

    for k in range(n):
        out_slot = alloc()
        vec[out_slot] = _unit(width, k + 1)
        target = coef[k + 1].copy()
        q_next = bases[k + 1] if k + 1 < n else None
        # Prefer converting out_k in place (least memory); fall back to keeping latents whole
        # when that conversion would amplify float32 rounding (PNDM's Runge-Kutta warm-up).
        best = None
        for allow_shift in (True, False):
            choice = _select(bases[k], q_next, target, vec, x_slot, out_slot, aux, allow_shift, lookahead)
            if choice is None:
                continue
            next_slot = -1 if choice[1] else x_slot  # placeholder: a new slot if x^(k) is kept
            program = _step_program(target, vec, x_slot, out_slot, aux, choice, next_slot)
            if program is not None and (best is None or program[2] < best[1][2]):
                best = (choice, program)
            if best is not None and best[1][2] <= AMPLIFICATION_LIMIT:
                break
        if best is None:
            raise CompileError(f"call {k}: the live latents do not span what the rest of the plan needs")
        (keep, keep_x, keep_out, _), (ops, local, _) = best
        live = 2 + len(aux) + int(keep_x)
        if keep_x:
            next_slot = alloc()
            last = ops[-1]
            ops[-1] = LinOp(next_slot, last.srcs, last.coefs)
        else:
            next_slot = x_slot
        vec.update(local)
        vec[next_slot] = target
        peak = max(peak, live)

        release = [a for a in aux if a not in keep] + ([] if keep_out else [out_slot])
        steps.append(RecurrentStep(x_slot, out_slot, tuple(ops), tuple(release), next_slot))
        free.extend(release)
        aux = keep + ([x_slot] if keep_x else []) + ([out_slot] if keep_out else [])
        carried.append(1 + len(aux))
        x_slot = next_slot

    plan = RecurrentPlan(
        init=init,
        steps=tuple(steps),
        result_slot=x_slot,
        num_slots=next_id[0],
        peak_latents=peak,
        carried=tuple(carried),
        max_error=0.0,
    )
    error = _reexpansion_error(plan, coef)
    if error > VERIFY_TOL:
        raise CompileError(f"recurrent form differs from the plan by {error:.3g} (relative); tolerance {VERIFY_TOL}")
    return RecurrentPlan(**{**plan.__dict__, "max_error": error})


def _reexpansion_error(plan: RecurrentPlan, coef: np.ndarray) -> float:
    """Run the program on coefficient vectors and compare every model input and the result."""
    width = coef.shape[0]
    slots: dict[int, np.ndarray] = {X_T_SLOT: _unit(width, 0)}

    def run(op: LinOp) -> None:
        slots[op.dst] = sum(c * slots[s] for s, c in zip(op.srcs, op.coefs))

    run(plan.init)
    worst = 0.0
    for k, step in enumerate(plan.steps):
        worst = max(worst, np.max(np.abs(slots[step.input_slot] - coef[k])))
        slots[step.output_slot] = _unit(width, k + 1)
        for op in step.ops:
            run(op)
        for s in step.release:
            del slots[s]
    worst = max(worst, np.max(np.abs(slots[plan.result_slot] - coef[-1])))
    return float(worst / max(np.max(np.abs(coef)), 1e-300))
