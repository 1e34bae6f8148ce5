"""Program: the compiled form of a StepPlan, the one thing every sampling loop runs.

A StepPlan's canonical form (`fastdiff.plan`) touches every basis column in every row, so
running it directly would keep all N+1 latents. After call k the rest of the plan only needs
the part of the past that lies in

    V_k = rowspace(coef[k+1:, :k+2])      (rows k+1..N, restricted to columns 0..k+1)

whose dimension is small for classic solvers (DDIM 1, a 2nd-order multistep solver 2, UniPC
with corrector 3) while a fitted OLSS plan may need all of it. `compile(plan)` derives the
Program in two stages:

1. (private) a program of elementwise linear combinations over slots that span V_k: carried
   latents that still lie in V_k stay as they are (no data moves); the new direction of call k
   is formed from (x^(k), out_k) in place of out_k's slot (e.g. x̂_0 = (x − σ·ε̂)/α for a
   data-prediction solver with an ε model); the next model input is written over x^(k); only if
   that does not cover V_k are further latents kept whole (never recombined), so the program
   stays as well conditioned in float32 as the scheduler loop it reproduces. Steps whose
   in-place conversion would amplify float32 rounding by more than 8x keep whole latents.
2. those combinations rewritten over (g, the rows as they were before the call), g being the
   call's guided output: each call becomes at most two rows of a coefficient table — the
   tables the fused step (`fastdiff.ops.fused_step`) reads on the device.

Basis row r of a loop's [num_rows, batch, ...] buffer holds one latent. Per call k:
dst[k, 0] (the output's own row, -1 when nothing keeps it) = gcoef[k, 0]·g + Σ_j coef[k, 0, j]·
basis[src[k, 0, j]] and dst[k, 1] (the next model input) likewise, both from the values before
the call; x_row[k] is call k's model input. Before the first call basis[init_row] =
init_coef·x_T; after the last one the result is basis[result_row].

A stochastic plan's noise (`fastdiff.plan`) enters the loop in one place: after call k the
loop adds noise[k]·ε_k (fresh standard normal noise) to row dst[k, 1], the next model input or the
result; from there the tables carry it like the rest of that latent. `compile` refuses plans
whose noise columns do not follow from that (the re-expansion checks it).

Every compiled Program is re-expanded symbolically and compared with the plan's coef (twin of
the C++ reader's check, csrc/runtime/program.cpp); `max_error` is the difference (float64
rounding for classic solvers). A plan file may carry its Program as a cache (`save`, `dumps`):
`load` verifies it the same way, never trusts it.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .dtypes import compute_dtype
from .gate import REUSE_MODES
from .plan import PlanError, StepPlan, _describe, _nonfinite_name

MIN_WIDTH = 8  # table width (columns per row) is a multiple of this: few distinct kernel variants
_CACHE_SIZE = 64  # compiled programs kept, by plan hash
X_T_SLOT = 0  # stage 1: slot 0 holds the caller's x_T, which is never written
RANK_TOL = 1e-9  # relative singular-value threshold for "this direction carries no weight"
EXPRESS_TOL = 1e-10  # relative residual accepted when writing a vector over available slots
VERIFY_TOL = 1e-8  # re-expanded program vs the plan, relative to max|coef| (as the C++ reader)
AMPLIFICATION_LIMIT = 8.0  # an op magnifying rounding more than this triggers the whole-latent choice


class ProgramError(PlanError):
    """A plan that cannot be compiled, or a program that does not compute its plan (a corrupt or
    foreign cache in a plan file); code "program", as the C++ reader says."""

    def __init__(self, message: str, path=None):
        self.detail = message
        super().__init__(f"{path}: plan program: {message}" if path else f"plan program: {message}", "program")


class DeviceTables(NamedTuple):
    """A Program's tables as tensors on one device (`Program.tables`)."""

    dst: object  # int32 [N, 2]
    src: object  # int32 [N, 2, width]
    coef: object  # float32 [N, 2, width] (float64 for float64 latents)
    gcoef: object  # like coef, [N, 2]
    x_row: object  # int32 [N]
    times: object  # float32 [N], the model time of each call


def extrapolation_rows(times) -> np.ndarray:
    """The skip rows of a plan with these model times: float64 [N, 2], row k = (a, b) such that a
    skipped call k's guided output is predicted as a·g_{k−1} + b·g_{k−2} (g_j the guided output
    call j used, itself predicted if j was skipped): the line through the two previous outputs,
    evaluated at t_k, i.e. a = 1 + r, b = −r with r = (t_k − t_{k−1}) / (t_{k−1} − t_{k−2}).
    Rows 0 and 1, and calls whose two previous times coincide (a solver's repeated evaluation
    time), repeat the last output: (1, 0). The C++ twin is fastdiff::reuse_rows (sampler.cpp)."""
    t = np.asarray(times, dtype=np.float64)
    rows = np.zeros((t.shape[0], 2))
    rows[:, 0] = 1.0
    for k in range(2, t.shape[0]):
        span = t[k - 1] - t[k - 2]
        if abs(span) > 1e-9 * max(abs(t[k - 1]), abs(t[k - 2]), 1.0):
            r = (t[k] - t[k - 1]) / span
            rows[k] = (1.0 + r, -r)
    return rows


@dataclass(frozen=True, eq=False)
class Program:
    """The fused-step tables of a plan (see the module docstring) and what they came from.

    Loops read the tables, `times` and `key`; `plan` is the canonical form it was compiled from
    (for plan files and verification).
    """

    plan: StepPlan
    num_rows: int  # latents a loop keeps (basis rows), besides the model output
    width: int
    dst: np.ndarray  # int32 [N, 2]
    src: np.ndarray  # int32 [N, 2, width]
    coef: np.ndarray  # float64 [N, 2, width]
    gcoef: np.ndarray  # float64 [N, 2]
    x_row: np.ndarray  # int32 [N]
    init_row: int
    init_coef: float
    result_row: int
    max_error: float  # max |re-expanded − coef| relative to max |coef|
    noise: np.ndarray | None = None  # float64 [N]: after call k, noise[k]·ε_k is added to row dst[k, 1]
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def stochastic(self) -> bool:
        """Whether the loop adds fresh noise after some calls."""
        return self.noise is not None

    @property
    def num_steps(self) -> int:
        """N, the model calls."""
        return int(self.dst.shape[0])

    @property
    def times(self) -> np.ndarray:
        """float64 [N], the model time of each call."""
        return self.plan.times

    @property
    def key(self) -> str:
        """Identifies what the program computes (the plan's hash): graph and sampler caches key on it."""
        return self.plan.hash()

    @property
    def carried(self) -> tuple[int, ...]:
        """Rows live from call k to call k+1 (read later before being overwritten), per call."""
        live: set[int] = {self.result_row}
        after = []
        for k in range(self.num_steps - 1, -1, -1):
            after.append(len(live))
            written = {int(d) for d in self.dst[k] if d >= 0}
            read = {int(s) for s in self.src[k].ravel() if s >= 0} | {int(self.x_row[k])}
            live = (live - written) | read
        return tuple(reversed(after))

    def reuse_rows(self, mode: str = "extrapolate") -> np.ndarray:
        """float64 [N, 2]: a skipped call k's guided output is row[k, 0]·g_{k−1} + row[k, 1]·g_{k−2}.
        "extrapolate": `extrapolation_rows` of the plan's times; "copy": (1, 0), the previous
        output repeated (AdaptiveDiffusion's reuse)."""
        if mode == "extrapolate":
            return extrapolation_rows(self.times)
        if mode == "copy":
            rows = np.zeros((self.num_steps, 2))
            rows[:, 0] = 1.0
            return rows
        raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)}, got {mode!r}")

    def reuse_table(self, device, dtype, mode: str = "extrapolate"):
        """`reuse_rows(mode)` on `device` (float32; float64 for float64 latents), copied once and
        cached like `tables`."""
        import torch

        device = torch.device(device)
        coef_dtype = compute_dtype(dtype)
        key = (str(device), coef_dtype, mode)
        cached = self._on_device.get(key)
        if cached is None:
            cached = torch.from_numpy(self.reuse_rows(mode)).to(device=device, dtype=coef_dtype)
            self._on_device[key] = cached
        return cached

    def tables(self, device, dtype) -> DeviceTables:
        """The tables on `device` for latents of `dtype` (copied once, then cached): float32
        coefficients, float64 for float64 latents."""
        import torch

        device = torch.device(device)
        coef_dtype = compute_dtype(dtype)
        key = (str(device), coef_dtype)
        cached = self._on_device.get(key)
        if cached is None:

            def put(a, dt):
                return torch.from_numpy(np.array(a)).to(device=device, dtype=dt)

            cached = DeviceTables(
                put(self.dst, torch.int32),
                put(self.src, torch.int32),
                put(self.coef, coef_dtype),
                put(self.gcoef, coef_dtype),
                put(self.x_row, torch.int32),
                put(self.times, torch.float32),
            )
            self._on_device[key] = cached
        return cached

    def to_dict(self) -> dict:
        """The tables as plain JSON values: the ``"program"`` field of a plan file (read by the
        C++ runtime); floats are written with repr, so they read back bit for bit."""
        return {
            "num_rows": int(self.num_rows),
            "width": int(self.width),
            "init_row": int(self.init_row),
            "init_coef": float(self.init_coef),
            "result_row": int(self.result_row),
            "x_row": [int(r) for r in self.x_row],
            "dst": self.dst.tolist(),
            "src": self.src.tolist(),
            "coef": self.coef.tolist(),
            "gcoef": self.gcoef.tolist(),
            **({"noise": self.noise.tolist()} if self.noise is not None else {}),
        }

    def __repr__(self) -> str:
        return f"Program({self.plan!r}, {self.num_rows} rows, width {self.width}, error {self.max_error:.1e})"


# ---------------------------------------------------------------------------------- public API
_compiled: OrderedDict[str, Program] = OrderedDict()
_lock = threading.Lock()


def compile(plan: StepPlan) -> Program:  # noqa: A001 - the one compile of the design
    """The Program of a plan (compiled once per plan hash, then cached; thread-safe)."""
    if not isinstance(plan, StepPlan):
        raise TypeError(f"compile needs a StepPlan, got {type(plan).__name__}")
    key = plan.hash()
    with _lock:
        program = _compiled.get(key)
        if program is not None:
            _compiled.move_to_end(key)
            return program if program.plan is plan else _rebind(program, plan)
    tables = _tables(_linear_program(plan.coef))
    if plan.stochastic:
        tables["noise"] = _noise_scales(plan)
    program = _from_tables(plan, tables)
    with _lock:
        _compiled[key] = program
        while len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
    return program


def _rebind(program: Program, plan: StepPlan) -> Program:
    """The same tables for an equal plan object (its metadata may differ)."""
    fields = {k: v for k, v in program.__dict__.items() if k not in ("plan", "_on_device")}
    return Program(plan=plan, _on_device=program._on_device, **fields)


INT_RANGE = 2**31 - 1  # table entries are int32 (the C++ reader refuses the same)


def _field(doc: dict, key: str):
    if key not in doc:
        raise ProgramError(f"field '{key}' is missing")
    return doc[key]


def _int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProgramError(f"{what} must be an integer, found {_describe(value)}")
    if abs(value) > INT_RANGE:
        raise ProgramError(f"{what} is out of range, found {value}")
    return value


def _number(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProgramError(f"{what} must be a number, found {_describe(value)}")
    if not math.isfinite(value):
        raise ProgramError(f"{what} is not finite ({_nonfinite_name(value)})")
    return float(value)


def _table(value, name: str, shape: tuple, leaf, dtype) -> np.ndarray:
    """A nested array of `shape` read leaf by leaf, in the C++ reader's order and words."""
    out = []

    def walk(node, depth: int, where: str) -> None:
        if depth == len(shape):
            out.append(leaf(node, where))
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            found = f"{len(node)} entries" if isinstance(node, list) else _describe(node)
            raise ProgramError(f"{where} must be an array of {shape[depth]} entries, found {found}")
        for i, item in enumerate(node):
            walk(item, depth + 1, f"{where}[{i}]")

    walk(value, 0, name)
    return np.array(out, dtype=dtype).reshape(shape)


def from_dict(doc, plan: StepPlan) -> Program:
    """A program read from a plan file's ``"program"`` field, verified against `plan` (never
    trusted); ProgramError names what is wrong with the C++ reader's checks, order and words."""
    if not isinstance(doc, dict):
        raise ProgramError(f"'program' must be an object, found {_describe(doc)}")
    n = plan.num_calls
    num_rows = _int(_field(doc, "num_rows"), "num_rows")
    width = _int(_field(doc, "width"), "width")
    if num_rows < 1 or width < 1 or width > 4096:
        raise ProgramError(f"num_rows and width must be in 1..4096, found {num_rows} and {width}")
    tables = {
        "num_rows": num_rows,
        "width": width,
        "init_row": _int(_field(doc, "init_row"), "init_row"),
        "init_coef": _number(_field(doc, "init_coef"), "init_coef"),
        "result_row": _int(_field(doc, "result_row"), "result_row"),
        "x_row": _table(_field(doc, "x_row"), "x_row", (n,), _int, np.int32),
        "dst": _table(_field(doc, "dst"), "dst", (n, 2), _int, np.int32),
        "src": _table(_field(doc, "src"), "src", (n, 2, width), _int, np.int32),
        "coef": _table(_field(doc, "coef"), "coef", (n, 2, width), _number, np.float64),
        "gcoef": _table(_field(doc, "gcoef"), "gcoef", (n, 2), _number, np.float64),
    }
    if ("noise" in doc) != plan.stochastic:
        raise ProgramError("the program's noise does not match the plan's (one is stochastic, the other not)")
    if plan.stochastic:
        tables["noise"] = _table(doc["noise"], "noise", (n,), _number, np.float64)
    return _from_tables(plan, tables)


def dumps(program: Program) -> str:
    """Plan file text carrying the program as a cache (the C++ runtime verifies and runs it)."""
    return program.plan.dumps(extra={"program": program.to_dict()})


def save(program: Program, path: str | Path) -> Path:
    """Write the plan file with its program (atomically, like StepPlan.save)."""
    return program.plan.save(path, extra={"program": program.to_dict()})


def load(path: str | Path) -> Program:
    """The Program of a plan file: its cached program verified against the plan, or compiled
    when the file carries none."""
    plan = StepPlan.load(path)
    doc = json.loads(Path(path).read_text())
    if "program" not in doc:
        return compile(plan)
    try:
        return from_dict(doc["program"], plan)
    except ProgramError as exc:
        raise ProgramError(exc.detail, path) from exc


# ---------------------------------------------------------------------------------- verification
def _from_tables(plan: StepPlan, t: dict) -> Program:
    for name in ("x_row", "dst", "src"):
        t[name] = np.ascontiguousarray(t[name], dtype=np.int32)
    for name in ("coef", "gcoef"):
        t[name] = np.ascontiguousarray(t[name], dtype=np.float64)
    if t.get("noise") is not None:
        t["noise"] = np.ascontiguousarray(t["noise"], dtype=np.float64)
    for name in ("x_row", "dst", "src", "coef", "gcoef", "noise"):
        if t.get(name) is not None:
            t[name].setflags(write=False)
    error = _verify(plan, t)
    return Program(plan=plan, max_error=error, **t)


def _verify(plan: StepPlan, t: dict) -> float:
    """Run the tables on coefficient vectors over the canonical basis and compare every model
    input and the result with the plan (the C++ twin: fastdiff::check_program). Returns the
    largest difference relative to max|coef|; ProgramError when a row is read before it is
    written or the difference exceeds VERIFY_TOL."""
    coef = plan.coef if plan.noise is None else np.hstack([plan.coef, plan.noise])  # rows over (basis, noise)
    n, d = plan.num_calls, coef.shape[1]
    noise = t.get("noise")
    rows, width = t["num_rows"], t["width"]
    if rows < 1 or width < 1:
        raise ProgramError("num_rows and width must be positive")
    if t["dst"].shape != (n, 2) or t["src"].shape != (n, 2, width) or t["x_row"].shape != (n,):
        raise ProgramError(f"table sizes do not match {n} calls x 2 rows x width {width}")

    def row_ok(r) -> bool:
        return 0 <= r < rows

    if not row_ok(t["init_row"]) or not row_ok(t["result_row"]):
        raise ProgramError(f"init_row/result_row outside 0..{rows - 1}")
    scale = max(float(np.max(np.abs(coef))), 1e-300)
    vec: list = [None] * rows
    vec[t["init_row"]] = np.zeros(d)
    vec[t["init_row"]][0] = t["init_coef"]
    worst = 0.0

    def compare(v, plan_row: int, what: str) -> None:
        nonlocal worst
        err = float(np.max(np.abs(v - coef[plan_row])))
        if not err <= VERIFY_TOL * scale:
            raise ProgramError(
                f"{what} differs from coef row {plan_row} by {err:.3g} (the program was compiled for another plan, "
                "or is corrupt)"
            )
        worst = max(worst, err)

    for k in range(n):
        call = f"call {k}"
        xr = int(t["x_row"][k])
        if not row_ok(xr) or vec[xr] is None:
            raise ProgramError(f"{call}: its input row {xr} is not written")
        compare(vec[xr], k, f"{call}'s input")
        new = [None, None]
        for i in range(2):
            dst = int(t["dst"][k, i])
            if dst < 0:
                continue
            if not row_ok(dst):
                raise ProgramError(f"{call}: writes row {dst} outside 0..{rows - 1}")
            v = np.zeros(d)
            v[k + 1] = t["gcoef"][k, i]
            for j in range(width):
                s = int(t["src"][k, i, j])
                if s < 0:
                    continue
                if not row_ok(s) or vec[s] is None:
                    raise ProgramError(f"{call}: reads row {s}, which holds nothing at that point")
                if i == 1 and s == int(t["dst"][k, 0]):
                    raise ProgramError(
                        f"{call}: the next input reads the row the output is written to in the same call"
                    )
                v = v + t["coef"][k, i, j] * vec[s]
            new[i] = v
        if int(t["dst"][k, 1]) < 0:
            raise ProgramError(f"{call}: writes no next input")
        if noise is not None and noise[k] != 0:
            new[1] = new[1].copy()
            new[1][n + 1 + k] += noise[k]
        for i in range(2):
            if new[i] is not None:
                vec[int(t["dst"][k, i])] = new[i]
    if vec[t["result_row"]] is None:
        raise ProgramError(f"the result row {t['result_row']} is never written")
    compare(vec[t["result_row"]], n, "the result")
    return worst / scale


def _noise_scales(plan: StepPlan) -> np.ndarray:
    """noise[k] of the Program: the weight of ε_k in the row right after call k (the next model
    input, or the result after the last call); ProgramError if a noise column skips that row."""
    z = plan.noise
    n = plan.num_calls
    scales = np.array([z[k + 1, k] for k in range(n)], dtype=np.float64)
    for k in range(n):
        if scales[k] == 0 and np.any(z[k + 1 :, k] != 0):
            first = k + 1 + int(np.flatnonzero(z[k + 1 :, k])[0])
            raise ProgramError(
                f"the noise drawn after call {k} first enters row {first}: a loop adds fresh noise to the next "
                f"model input (row {k + 1}) only"
            )
    return scales


# ---------------------------------------------------------------------------------- compiler
# Stage 1: the plan as linear combinations over slots (slot 0 = x_T); stage 2 (`_tables`)
# rewrites them over (g, the rows before the call).


@dataclass(frozen=True)
class _LinOp:
    """slot[dst] = Σ coefs[i]·slot[srcs[i]], elementwise (dst may be among srcs)."""

    dst: int
    srcs: tuple[int, ...]
    coefs: tuple[float, ...]


@dataclass(frozen=True)
class _Step:
    """One model call: run the model on slot ``input_slot``, put its output in ``output_slot``,
    run ``ops`` in order, then free the slots in ``release``. ``next_slot`` then holds the next
    model input (the result after the last call)."""

    input_slot: int
    output_slot: int
    ops: tuple[_LinOp, ...]
    release: tuple[int, ...]
    next_slot: int


@dataclass(frozen=True)
class _Linear:
    init: _LinOp  # first model input from x_T
    steps: tuple[_Step, ...]
    result_slot: int
    num_slots: int  # slot ids used, x_T's slot 0 included
    peak_latents: int  # most slots alive at once, the model output included
    carried: tuple[int, ...]  # latents carried from call k to call k+1 (>= dim V_k)

    @property
    def num_ops(self) -> int:
        return sum(len(s.ops) for s in self.steps)


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


def _amplification(op: _LinOp, vec: dict[int, np.ndarray]) -> float:
    """How much an op can magnify relative rounding: Σ|c_i|·|v_i| / |Σ c_i·v_i| (coefficient
    norms stand in for latent magnitudes, since every basis latent is O(1))."""
    total = sum(abs(c) * np.linalg.norm(vec[s]) for s, c in zip(op.srcs, op.coefs))
    result = np.linalg.norm(sum(c * vec[s] for s, c in zip(op.srcs, op.coefs)))
    return float(total / max(result, 1e-300))


def _step_program(target, vec, x_slot, out_slot, aux, choice, next_slot):
    """The ops of one call for a selection, and their worst amplification."""
    _, _, _, out_shift = choice
    local = dict(vec)
    ops: list[_LinOp] = []
    if out_shift != 0.0:
        ops.append(_LinOp(out_slot, (out_slot, x_slot), (1.0, out_shift)))
        local[out_slot] = vec[out_slot] + out_shift * vec[x_slot]
    expressed = _express(target, [x_slot, out_slot] + aux, local)
    if expressed is None:
        return None
    ops.append(_LinOp(next_slot, tuple(expressed[0]), tuple(float(c) for c in expressed[1])))
    amp = max(_amplification(op, local if i else vec) for i, op in enumerate(ops))
    return ops, local, amp


def _linear_program(coef: np.ndarray) -> _Linear:
    """Stage 1: the linear-combination program of a validated canonical coef matrix.

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


def _compile(coef: np.ndarray, bases: list[np.ndarray], lookahead: bool) -> _Linear:
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
    init = _LinOp(x_slot, (X_T_SLOT,), (float(coef[0, 0]),))
    aux: list[int] = []
    steps: list[_Step] = []
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
            raise ProgramError(f"call {k}: the live latents do not span what the rest of the plan needs")
        (keep, keep_x, keep_out, _), (ops, local, _) = best
        live = 2 + len(aux) + int(keep_x)
        if keep_x:
            next_slot = alloc()
            last = ops[-1]
            ops[-1] = _LinOp(next_slot, last.srcs, last.coefs)
        else:
            next_slot = x_slot
        vec.update(local)
        vec[next_slot] = target
        peak = max(peak, live)

        release = [a for a in aux if a not in keep] + ([] if keep_out else [out_slot])
        steps.append(_Step(x_slot, out_slot, tuple(ops), tuple(release), next_slot))
        free.extend(release)
        aux = keep + ([x_slot] if keep_x else []) + ([out_slot] if keep_out else [])
        carried.append(1 + len(aux))
        x_slot = next_slot

    return _Linear(
        init=init,
        steps=tuple(steps),
        result_slot=x_slot,
        num_slots=next_id[0],
        peak_latents=peak,
        carried=tuple(carried),
    )


def _tables(linear: _Linear) -> dict:
    """Stage 2: rewrite the linear program as fused-step tables (basis row r = slot r + 1; slot
    0 is x_T, read only by the init op), checking that every op reads only live slots (written
    earlier and not yet released)."""
    n = len(linear.steps)

    def row(slot: int, where: str) -> int:
        if not 0 < slot < linear.num_slots:
            raise ProgramError(f"{where}: slot {slot} is outside 1..{linear.num_slots - 1}")
        return slot - 1

    if linear.init.srcs != (X_T_SLOT,):
        raise ProgramError(f"the init op must read x_T (slot {X_T_SLOT}) only, got slots {linear.init.srcs}")
    live = {linear.init.dst: "init"}
    freed: dict[int, int] = {}
    rows_per_step = []
    for k, step in enumerate(linear.steps):

        def check_live(slot: int, what: str) -> None:
            if slot not in live:
                when = f"released after call {freed[slot]}" if slot in freed else "never written"
                raise ProgramError(f"call {k}: {what} reads slot {slot}, which is {when} (a freed basis column)")

        check_live(step.input_slot, "the model input")
        if step.output_slot in live:
            raise ProgramError(f"call {k}: the model output goes to slot {step.output_slot}, which is still live")
        # Each slot's value as a combination of g (key None) and the slots before the call.
        expr: dict[int, dict] = {step.output_slot: {None: 1.0}}
        written: list[int] = []
        for op in step.ops:
            total: dict = {}
            for s, c in zip(op.srcs, op.coefs):
                if s not in expr:
                    check_live(s, "an op")
                for key, value in expr.get(s, {s: 1.0}).items():
                    total[key] = total.get(key, 0.0) + float(c) * value
            expr[op.dst] = total
            if op.dst not in written:
                written.append(op.dst)
            live.setdefault(op.dst, k)
        live[step.output_slot] = k
        for s in step.release:
            if s not in live:
                raise ProgramError(f"call {k}: releases slot {s}, which is not live")
            del live[s]
            freed[s] = k
        if step.next_slot not in live:
            raise ProgramError(f"call {k}: the next model input (slot {step.next_slot}) is not live after the call")
        extra = [s for s in written if s not in (step.output_slot, step.next_slot) and s in live]
        if extra:
            raise ProgramError(f"call {k}: writes slots {extra} besides the output and the next input")
        out_row = None
        if step.output_slot in live and step.output_slot != step.next_slot:
            out_row = (row(step.output_slot, f"call {k}"), expr[step.output_slot])
        next_expr = expr.get(step.next_slot, {step.next_slot: 1.0})
        rows_per_step.append(
            (row(step.input_slot, f"call {k}"), out_row, (row(step.next_slot, f"call {k}"), next_expr))
        )

    terms = [len([key for key in e if key is not None]) for _, out_row, (_, e) in rows_per_step]
    terms += [len([key for key in out_row[1] if key is not None]) for _, out_row, _ in rows_per_step if out_row]
    width = max(terms + [1])
    width = -(-width // MIN_WIDTH) * MIN_WIDTH
    dst = np.full((n, 2), -1, dtype=np.int32)
    src = np.full((n, 2, width), -1, dtype=np.int32)
    coef = np.zeros((n, 2, width))
    gcoef = np.zeros((n, 2))
    x_row = np.zeros(n, dtype=np.int32)
    for k, (xr, out_row, next_row) in enumerate(rows_per_step):
        x_row[k] = xr
        for i, entry in enumerate((out_row, next_row)):
            if entry is None:
                continue
            dst[k, i], e = entry
            gcoef[k, i] = e.get(None, 0.0)
            for j, (slot, c) in enumerate((s, c) for s, c in e.items() if s is not None):
                src[k, i, j] = row(slot, f"call {k}")
                coef[k, i, j] = c
    return {
        "num_rows": linear.num_slots - 1,
        "width": width,
        "dst": dst,
        "src": src,
        "coef": coef,
        "gcoef": gcoef,
        "x_row": x_row,
        "init_row": row(linear.init.dst, "init"),
        "init_coef": float(linear.init.coefs[0]),
        "result_row": row(linear.result_slot, "result"),
    }
