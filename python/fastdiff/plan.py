"""StepPlan: the one data representation of every explicit sampler.

With N model calls a plan holds ``times`` (float64 [N], the model time of each call) and
``coef`` (float64 lower-triangular [N+1, N+1]) over the basis b_0 = x_T, b_{j+1} = out_j, the
raw model output of call j (after guidance):

    input of call k:  x^(k) = Σ_{j≤k} coef[k, j]·b_j          result: Σ_j coef[N, j]·b_j

A stochastic sampler adds fresh-noise columns (DESIGN §1): ``noise`` (float64 [N+1, N]) with
ε_m, standard normal, drawn after call m:

    input of call k:  x^(k) = Σ_{j≤k} coef[k, j]·b_j + Σ_{m<k} noise[k, m]·ε_m

A plan without noise (``noise is None``) is deterministic; its file is version 1, a stochastic
plan's version 2 (readers that only run deterministic plans refuse it by its version).

The canonical form is the file format (versioned JSON). Loops never run it directly:
``fastdiff.program.compile(plan)`` derives the Program, which carries only the latents the
rest of the plan still needs. This module is data, validation, IO and identity only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write
from .schedules import PREDICTION_TYPES

PLAN_FORMAT = "fastdiff.stepplan"
PLAN_VERSION = 1
STOCHASTIC_PLAN_VERSION = 2  # a plan with fresh-noise columns


MAX_PLAN_BYTES = 64 << 20  # a 1000-call plan is about 20 MB (the C++ reader's kMaxPlanBytes)
MAX_JSON_DEPTH = 64  # nesting the readers accept (the C++ parser's kMaxDepth)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}:,]|[^\s\[\]{}:,"]+')


def _depth(doc) -> int:
    """Nesting depth of a parsed JSON value (a scalar: 0, [] or [1]: 1)."""
    deepest, stack = 0, [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _too_deep(text: str) -> str | None:
    """Where the first value nested deeper than MAX_JSON_DEPTH starts, as the C++ parser says it
    (" at offset N", or the truncated-file hint), or None."""
    open_ = []  # the open containers: "[" or "{"
    expect_value = True  # at the document's start, after "[", "," in an array, or ":"
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok in ("]", "}"):
            if open_:
                open_.pop()
            expect_value = False
            continue
        if tok == ",":
            expect_value = bool(open_) and open_[-1] == "["
            continue
        if tok == ":":
            expect_value = True
            continue
        if expect_value and len(open_) > MAX_JSON_DEPTH:
            return f" at offset {m.start()}"
        if tok in ("[", "{"):
            open_.append(tok)
            expect_value = tok == "["
        else:
            expect_value = False
    if len(open_) > MAX_JSON_DEPTH:
        return " (the text ends early: truncated file?)"
    return None


class PlanError(ValueError):
    """A plan or plan file that cannot be used.

    ``code`` is a short stable category shared with the C++ reader: json, format, version,
    field, shape, nonfinite, triangular, first_row, prediction_type, time_range, io, schedule.
    """

    def __init__(self, message: str, code: str = "plan"):
        super().__init__(message)
        self.code = code


def _describe(value: Any) -> str:
    """How a JSON value is named in error messages (the C++ reader says the same)."""
    if isinstance(value, str):
        return f"'{value}'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


class StepPlan:
    """times + coef + prediction type + the schedule it was made for, validated on construction.

    Plans are immutable values: arrays are read-only and derived forms are cached.
    """

    def __init__(
        self,
        times,
        coef,
        prediction_type: str,
        *,
        schedule_fingerprint: str | None = None,
        num_train_timesteps: int | None = None,
        metadata: Mapping | None = None,
        noise=None,
    ):
        self.times = np.array(times, dtype=np.float64)
        self.coef = np.array(coef, dtype=np.float64)
        self.noise = None if noise is None else np.array(noise, dtype=np.float64)
        if self.noise is not None:
            self.noise.setflags(write=False)
        self.prediction_type = prediction_type
        self.schedule_fingerprint = schedule_fingerprint
        self.num_train_timesteps = num_train_timesteps
        self.metadata = dict(metadata or {})
        self.times.setflags(write=False)
        self.coef.setflags(write=False)
        self.validate()

    # ---------------------------------------------------------------- basic facts
    @property
    def num_calls(self) -> int:
        """N, the number of model calls (rows of coef minus one)."""
        return int(self.times.size)

    @property
    def stochastic(self) -> bool:
        """Whether the plan adds fresh noise (has noise columns)."""
        return self.noise is not None

    @property
    def nfe(self) -> int:
        """Network function evaluations: one per call (a CFG call on the 2x batch counts once)."""
        return self.num_calls

    def column_lifetimes(self, atol: float = 0.0) -> np.ndarray:
        """For each basis column j, the last row of the canonical form that uses it (|coef| > atol).

        In canonical form a classic solver's columns all live to the last row; the memory a loop
        actually holds is the compiled Program's ``num_rows``.
        """
        used = np.abs(self.coef) > atol
        rows = np.arange(self.coef.shape[0])[:, None]
        return np.where(used, rows, -1).max(axis=0)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise PlanError naming the first inconsistency (same order and text as the C++ reader)."""
        t, c = self.times, self.coef
        if t.ndim != 1:
            raise PlanError(f"times must be 1-D, got shape {t.shape}", "shape")
        n = t.size
        if n == 0:
            raise PlanError("plan has no model calls: 'times' is empty", "shape")
        if c.ndim != 2 or c.shape[0] != n + 1 or c.shape[1] != n + 1:
            raise PlanError(
                f"plan coef has shape {tuple(c.shape)}, expected ({n + 1}, {n + 1}) = times + 1",
                "shape",
            )
        if not np.all(np.isfinite(t)):
            k = int(np.flatnonzero(~np.isfinite(t))[0])
            raise PlanError(f"times[{k}] is not finite ({_nonfinite_name(t[k])})", "nonfinite")
        if not np.all(np.isfinite(c)):
            i, j = (int(v) for v in np.argwhere(~np.isfinite(c))[0])
            raise PlanError(f"coef[{i}][{j}] is not finite ({_nonfinite_name(c[i, j])})", "nonfinite")
        upper = np.triu(c, 1)
        if np.any(upper != 0):
            i, j = (int(v) for v in np.argwhere(upper != 0)[0])
            raise PlanError(
                f"coef is not lower-triangular: coef[{i}][{j}] is nonzero above the diagonal "
                "(row k may only use x_T and the outputs of calls before k)",
                "triangular",
            )
        if c[0, 0] == 0:
            raise PlanError("coef[0][0] is 0: the first model input must depend on x_T", "first_row")
        if self.noise is not None:
            self._validate_noise()
        if self.prediction_type not in PREDICTION_TYPES:
            raise PlanError(
                f"unknown prediction_type '{self.prediction_type}': expected one of {', '.join(PREDICTION_TYPES)}",
                "prediction_type",
            )
        if self.num_train_timesteps is not None:
            if not _is_integer(self.num_train_timesteps) or self.num_train_timesteps < 1:
                raise PlanError(
                    "schedule 'num_train_timesteps' must be a positive integer or null, found "
                    f"{_describe(self.num_train_timesteps)}",
                    "field",
                )
            out = (t < 0) | (t > float(self.num_train_timesteps) - 1)
            if np.any(out):
                k = int(np.flatnonzero(out)[0])
                raise PlanError(
                    f"times[{k}] is outside the schedule's time range [0, {self.num_train_timesteps - 1}]",
                    "time_range",
                )
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan metadata must be plain JSON: {exc}", "field") from exc

    def _validate_noise(self) -> None:
        z, n = self.noise, self.times.size
        if z.shape != (n + 1, n):
            raise PlanError(
                f"plan noise has shape {tuple(z.shape)}, expected ({n + 1}, {n}) = (times + 1, times)", "shape"
            )
        if not np.all(np.isfinite(z)):
            i, j = (int(v) for v in np.argwhere(~np.isfinite(z))[0])
            raise PlanError(f"noise[{i}][{j}] is not finite ({_nonfinite_name(z[i, j])})", "nonfinite")
        early = np.triu(z)  # noise[k, m] with m >= k: drawn after call m, it cannot reach row k <= m
        if np.any(early != 0):
            i, j = (int(v) for v in np.argwhere(early != 0)[0])
            raise PlanError(
                f"noise[{i}][{j}] is nonzero: the noise drawn after call {j} can only enter rows after {j}",
                "triangular",
            )
        if not np.any(z != 0):
            raise PlanError("plan noise is all zeros: a deterministic plan has no 'noise' field", "field")

    def check_schedule(self, schedule) -> None:
        """Raise PlanError if this plan was made for another noise schedule or prediction type."""
        if self.schedule_fingerprint is not None and self.schedule_fingerprint != schedule.fingerprint:
            raise PlanError(
                f"plan was made for schedule {self.schedule_fingerprint} but the model's schedule is "
                f"{schedule.fingerprint}",
                "schedule",
            )
        if self.prediction_type != schedule.prediction_type:
            raise PlanError(
                f"plan expects {self.prediction_type} model outputs but the model predicts {schedule.prediction_type}",
                "schedule",
            )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = {
            "format": PLAN_FORMAT,
            "version": STOCHASTIC_PLAN_VERSION if self.stochastic else PLAN_VERSION,
            "prediction_type": self.prediction_type,
            "times": [float(x) for x in self.times],
            "coef": [[float(x) for x in row] for row in self.coef],
            "schedule": {
                "fingerprint": self.schedule_fingerprint,
                "num_train_timesteps": self.num_train_timesteps,
            },
            "metadata": self.metadata,
        }
        if self.stochastic:
            d["noise"] = [[float(x) for x in row] for row in self.noise]
        return d

    def dumps(self, *, extra: Mapping | None = None) -> str:
        """JSON text; floats are written with repr, so they read back bit for bit.

        extra: further top-level fields written before the metadata (`fastdiff.program.dumps`
        puts the compiled program there); readers that do not know them ignore them."""
        d = self.to_dict()
        coef = d.pop("coef")
        metadata = d.pop("metadata")
        noise = d.pop("noise", None)
        head = json.dumps(d, indent=1, allow_nan=False)[:-2]
        rows = ",\n  ".join(json.dumps(row, allow_nan=False) for row in coef)
        meta = json.dumps(metadata, indent=1, sort_keys=True, allow_nan=False).replace("\n", "\n ")
        more = "".join(f",\n {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in (extra or {}).items())
        if noise is not None:
            more = (
                ',\n "noise": [\n  ' + ",\n  ".join(json.dumps(row, allow_nan=False) for row in noise) + "\n ]" + more
            )
        return f'{head},\n "coef": [\n  {rows}\n ]{more},\n "metadata": {meta}\n}}\n'

    def save(self, path: str | Path, *, extra: Mapping | None = None) -> Path:
        """Write the plan file atomically (`dumps`)."""
        path = Path(path)
        try:
            text = self.dumps(extra=extra)
        except ValueError as exc:  # json refuses NaN/inf in metadata with allow_nan=False
            raise PlanError(f"plan metadata must hold finite numbers to be saved: {exc}", "field") from exc
        return atomic_write(path, text)  # never leave a half-written plan behind

    @classmethod
    def from_dict(cls, doc: Any) -> StepPlan:
        """Build from a parsed plan document, reporting problems in the C++ reader's order."""
        if not isinstance(doc, dict):
            raise PlanError(f"plan file must hold a JSON object, found {_describe(doc)}", "format")
        if "format" not in doc:
            raise PlanError(
                "not a fastdiff StepPlan file: it has no 'format' field (expected 'fastdiff.stepplan')",
                "format",
            )
        if doc["format"] != PLAN_FORMAT:
            raise PlanError(
                f"not a fastdiff StepPlan file: 'format' is {_describe(doc['format'])}, expected '{PLAN_FORMAT}'",
                "format",
            )
        if "version" not in doc:
            raise PlanError(f"plan file has no 'version' field (this fastdiff reads version {PLAN_VERSION})", "version")
        version = doc["version"]
        if not _is_integer(version):
            raise PlanError(f"plan 'version' must be an integer, found {_describe(version)}", "version")
        if version not in (PLAN_VERSION, STOCHASTIC_PLAN_VERSION):
            raise PlanError(
                f"unknown plan version {version}: this fastdiff reads version {PLAN_VERSION} (deterministic plans) and "
                f"version {STOCHASTIC_PLAN_VERSION} (stochastic plans, Python only)",
                "version",
            )
        for key in ("prediction_type", "times", "coef"):
            if key not in doc:
                raise PlanError(f"plan field '{key}' is missing", "field")
        pred = doc["prediction_type"]
        if not isinstance(pred, str):
            raise PlanError(f"plan field 'prediction_type' must be a string, found {_describe(pred)}", "field")
        times = doc["times"]
        if not isinstance(times, list):
            raise PlanError(f"plan field 'times' must be an array of numbers, found {_describe(times)}", "field")
        for k, x in enumerate(times):
            if not _is_number(x):
                raise PlanError(f"times[{k}] must be a number, found {_describe(x)}", "field")
        coef = doc["coef"]
        if not isinstance(coef, list):
            raise PlanError(f"plan field 'coef' must be an array of rows, found {_describe(coef)}", "field")
        for i, row in enumerate(coef):
            if not isinstance(row, list):
                raise PlanError(f"coef row {i} must be an array of numbers, found {_describe(row)}", "field")
            for j, x in enumerate(row):
                if not _is_number(x):
                    raise PlanError(f"coef[{i}][{j}] must be a number, found {_describe(x)}", "field")
        fingerprint = num_train = None
        schedule = doc.get("schedule")
        if schedule is not None:
            if not isinstance(schedule, dict):
                raise PlanError(
                    f"plan field 'schedule' must be an object or null, found {_describe(schedule)}", "field"
                )
            fingerprint = schedule.get("fingerprint")
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise PlanError(
                    f"schedule 'fingerprint' must be a string or null, found {_describe(fingerprint)}", "field"
                )
            num_train = schedule.get("num_train_timesteps")
            if num_train is not None and (not _is_integer(num_train) or num_train < 1):
                raise PlanError(
                    f"schedule 'num_train_timesteps' must be a positive integer or null, found {_describe(num_train)}",
                    "field",
                )
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise PlanError(f"plan field 'metadata' must be an object, found {_describe(metadata)}", "field")
        n = len(times)
        if n == 0:
            raise PlanError("plan has no model calls: 'times' is empty", "shape")
        if len(coef) != n + 1:
            raise PlanError(f"plan has {len(coef)} coef rows but {n} times (expected {n + 1} = times + 1)", "shape")
        for i, row in enumerate(coef):
            if len(row) != n + 1:
                raise PlanError(f"coef row {i} has {len(row)} entries, expected {n + 1}", "shape")
        noise = doc.get("noise")
        if (noise is None) != (version == PLAN_VERSION):
            raise PlanError(
                f"a version {version} plan "
                + ("must have" if noise is None else "cannot have")
                + " a 'noise' field (version 2 plans are the stochastic ones)",
                "field",
            )
        if noise is not None:
            if not isinstance(noise, list) or len(noise) != n + 1:
                raise PlanError(f"plan field 'noise' must be an array of {n + 1} rows of {n} numbers", "field")
            for i, row in enumerate(noise):
                if not isinstance(row, list) or len(row) != n:
                    raise PlanError(f"noise row {i} must be an array of {n} numbers", "shape")
                for j, x in enumerate(row):
                    if not _is_number(x):
                        raise PlanError(f"noise[{i}][{j}] must be a number, found {_describe(x)}", "field")
        return cls(
            times,
            coef,
            pred,
            schedule_fingerprint=fingerprint,
            num_train_timesteps=num_train,
            metadata=metadata,
            noise=noise,
        )

    @classmethod
    def loads(cls, text: str) -> StepPlan:
        size = len(text) if len(text) * 4 <= MAX_PLAN_BYTES else len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_PLAN_BYTES:
            raise PlanError(
                f"plan file is {size} bytes; this fastdiff reads plans of at most {MAX_PLAN_BYTES} bytes (64 MiB)",
                "size",
            )
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (the text ends early: truncated file?)" if exc.pos >= len(text.rstrip()) else ""
            raise PlanError(f"plan file is not valid JSON: {exc.msg} at offset {exc.pos}{hint}", "json") from exc
        except RecursionError:
            doc = None  # nested deeper than Python's own limit: found by the scan below
        if doc is None or _depth(doc) > MAX_JSON_DEPTH:
            where = _too_deep(text)
            if where is not None:
                raise PlanError(f"plan file is not valid JSON: nesting deeper than {MAX_JSON_DEPTH}{where}", "json")
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | Path) -> StepPlan:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot open plan file '{path}': {exc}", "io") from exc
        try:
            return cls.loads(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}", exc.code) from exc

    def with_metadata(self, **updates) -> StepPlan:
        """The same plan with metadata keys added or replaced (plans are immutable)."""
        return StepPlan(
            self.times,
            self.coef,
            self.prediction_type,
            schedule_fingerprint=self.schedule_fingerprint,
            num_train_timesteps=self.num_train_timesteps,
            metadata={**self.metadata, **updates},
            noise=self.noise,
        )

    # ---------------------------------------------------------------- identity
    def hash(self) -> str:
        """sha256 over everything that changes what the plan computes (not the metadata)."""
        h = hashlib.sha256()
        h.update(self.prediction_type.encode())
        h.update(str(self.schedule_fingerprint).encode())
        h.update(self.times.astype("<f8").tobytes())
        h.update(self.coef.astype("<f8").tobytes())
        if self.noise is not None:  # deterministic plans keep the hashes they always had
            h.update(b"noise")
            h.update(self.noise.astype("<f8").tobytes())
        return f"sha256:{h.hexdigest()[:16]}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return (
            self.prediction_type == other.prediction_type
            and self.schedule_fingerprint == other.schedule_fingerprint
            and self.num_train_timesteps == other.num_train_timesteps
            and np.array_equal(self.times, other.times)
            and np.array_equal(self.coef, other.coef)
            and (self.noise is None) == (other.noise is None)
            and (self.noise is None or np.array_equal(self.noise, other.noise))
            and self.metadata == other.metadata
        )

    __hash__ = None  # mutable metadata dict: plans are compared, not used as dict keys

    def __repr__(self) -> str:
        solver = self.metadata.get("solver", "custom")
        kind = ", stochastic" if self.stochastic else ""
        return f"StepPlan({solver}, nfe={self.nfe}, {self.prediction_type}{kind}, {self.hash()})"
