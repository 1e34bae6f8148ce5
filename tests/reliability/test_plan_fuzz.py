"""Fuzzed plan files through both readers (issue 23, part 1): seeded mutations of real plan files,
with and without their program section, through the Python reader (`StepPlan.loads`, the
program verified as `fastdiff.program.load` does) and the C++ reader (`_C.parse_plan`, which
verifies the program too). Every case must end in a clear PlanError or a load, never another
exception or a hang; both readers must agree on accept/reject and on the error's code.

Categories: truncation, wrong types and values at a random place, NaN/inf, missing keys,
non-triangular coef, wrong shapes, huge N, deep nesting, a file over the size cap, programs
spliced from other plans, byte flips. Counted by tests/reliability/counts.py (`make
test-reliability` prints the table).
"""

from __future__ import annotations

import json
import random
import signal
from collections import Counter

import pytest

from fastdiff import program as programs
from fastdiff import solvers
from fastdiff.plan import MAX_PLAN_BYTES, PlanError, StepPlan
from fastdiff.schedules import PRESETS, DiscreteSchedule
from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

SEED = 23
CASES = 600


def _bases() -> list[str]:
    """Plan files as users get them: fitted-looking and classic plans, with and without programs."""
    schedule = DiscreteSchedule.from_config(PRESETS["sd15"])
    texts = []
    for solver, steps in (("ddim", 4), ("dpmpp_2m", 6), ("unipc_bh2", 5), ("pndm", 4)):
        plan = solvers.build_variant(solver, schedule, steps)
        texts.append(plan.dumps())
        texts.append(programs.dumps(programs.compile(plan)))
    return texts


def py_read(text: str):
    """The Python reader on text, as `program.load` reads a file."""
    plan = StepPlan.loads(text)
    doc = json.loads(text)
    if "program" in doc:
        programs.from_dict(doc["program"], plan)
    return plan


def _outcome(fn, text: str) -> tuple:
    try:
        fn(text)
    except PlanError as exc:
        return ("reject", exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - anything but a PlanError is a crash here
        return ("crash", type(exc).__name__, str(exc)[:300])
    return ("accept", None, "")


# ---------------------------------------------------------------------------------- mutations
SCALARS = ["x", "", True, False, None, 0, -1, 1e308, -0.0, 3.5, 10**30, float("nan"), float("inf"), [], {}]


def _paths(doc, prefix=()):
    """Every (container path, key) in doc."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:12]):  # the first rows and entries are enough
            yield prefix, i
            yield from _paths(v, prefix + (i,))


def _at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def mutate(rng: random.Random, text: str, other: str) -> tuple[str, str]:
    """(category, mutated text)."""
    doc = json.loads(text)
    kind = rng.choice(
        ["truncate", "replace", "replace", "delete", "upper", "shape", "huge_n", "deep", "splice", "flip", "nonfinite"]
    )
    if kind == "truncate":
        return kind, text[: rng.randrange(len(text))]
    if kind == "flip":
        i = rng.randrange(len(text))
        return kind, text[:i] + rng.choice('x0-."{}[],:e ') + text[i + 1 :]
    if kind in ("replace", "delete", "nonfinite", "deep"):
        container_path, key = rng.choice(list(_paths(doc)))
        container = _at(doc, container_path)
        if kind == "delete" and isinstance(container, dict):
            del container[key]
        elif kind == "delete":
            del container[key]
        elif kind == "nonfinite":
            container[key] = rng.choice([float("nan"), float("inf"), float("-inf")])
        elif kind == "deep":
            depth = rng.choice([63, 64, 65, 70, 200, 3000, 100000])
            container[key] = "__deep__"  # written as text: json.dumps itself cannot nest that deep
            return kind, json.dumps(doc).replace('"__deep__"', "[" * depth + "1" + "]" * depth, 1)
        else:
            container[key] = rng.choice(SCALARS)
        return kind, json.dumps(doc)
    if kind == "upper":
        n = len(doc["coef"])
        i = rng.randrange(n - 1)
        doc["coef"][i][rng.randrange(i + 1, n)] = 0.5
        return kind, json.dumps(doc)
    if kind == "shape":
        what = rng.choice(["row", "entry", "time", "extra_time"])
        if what == "row":
            doc["coef"].pop(rng.randrange(len(doc["coef"])))
        elif what == "entry":
            doc["coef"][rng.randrange(len(doc["coef"]))].append(0.0)
        elif what == "time":
            doc["times"].pop()
        else:
            doc["times"].append(1.0)
        return kind, json.dumps(doc)
    if kind == "huge_n":
        n = rng.choice([1000, 5000])
        doc["times"] = [float(999 - i % 999) for i in range(n)]
        return kind, json.dumps(doc)
    # splice: the program of another plan (or a program where none belongs)
    other_doc = json.loads(other)
    if "program" in other_doc:
        doc["program"] = other_doc["program"]
    else:
        doc["program"] = {"num_rows": 1, "width": 8}
    return kind, json.dumps(doc)


def _cases():
    rng = random.Random(SEED)
    bases = _bases()
    cases = []
    for i in range(CASES):
        text, other = rng.choice(bases), rng.choice(bases)
        kind, mutated = mutate(rng, text, other)
        if rng.random() < 0.15:  # a second mutation on top
            try:
                kind2, mutated = mutate(rng, mutated, other)
                kind = f"{kind}+{kind2}"
            except (json.JSONDecodeError, ValueError, IndexError, KeyError, TypeError, RecursionError):
                pass
        cases.append((i, kind.split("+")[0], mutated))
    # one file over the size cap (the readers must refuse it before parsing it)
    big = bases[0][:-2] + ', "padding": "' + "x" * (MAX_PLAN_BYTES + 16) + '"\n}\n'
    cases.append((CASES, "oversized", big))
    return cases


def _cpp():
    try:
        from fastdiff import _C
    except ImportError as exc:
        pytest.skip(f"C++ extension fastdiff._C not built: {exc}")
    return _C


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def test_fuzzed_plan_files_get_the_same_clear_answer_from_both_readers():
    cpp = _cpp()
    counts: Counter = Counter()
    per_kind: dict[str, Counter] = {}
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, kind, text in _cases():
            signal.alarm(20)  # a hang is a failure, not a stuck CI
            try:
                py = _outcome(py_read, text)
                cc = _outcome(cpp.parse_plan, text)
            except _Timeout:
                py = cc = ("hang", None, "")
            finally:
                signal.alarm(0)
            k = per_kind.setdefault(kind, Counter())
            k["cases"] += 1
            for who, out in (("python", py), ("c++", cc)):
                k[f"{who} {out[0]}"] += 1
            if py[0] in ("crash", "hang") or cc[0] in ("crash", "hang"):
                problems.append((i, kind, "crash/hang", py, cc))
            elif py[0] != cc[0]:
                problems.append((i, kind, "accept/reject differ", py, cc))
            elif py[0] == "reject" and py[1] != cc[1]:
                problems.append((i, kind, "codes differ", py, cc))
            counts["cases"] += 1
            counts["rejected"] += py[0] == "reject"
            counts["accepted"] += py[0] == "accept"
    finally:
        signal.signal(signal.SIGALRM, old)
    crashes = sum(p[2] == "crash/hang" for p in problems)
    # mutations that can never leave a valid plan: a load there would be silent
    always_bad = {"truncate", "upper", "shape", "huge_n", "deep", "oversized"}
    silent = sum(max(v["python accept"], v["c++ accept"]) for k, v in per_kind.items() if k in always_bad)
    record(
        "plan_fuzz",
        "plan files and programs (Python and C++ readers agree)",
        cases=counts["cases"],
        bad_inputs=counts["rejected"] + silent,
        clear_errors=counts["rejected"],
        loads=counts["accepted"],
        crashes=crashes,
        silent_loads=silent,
        hangs=sum(p[3][0] == "hang" for p in problems),
        per_category={k: dict(v) for k, v in sorted(per_kind.items())},
        notes=f"{sum(p[2] != 'crash/hang' for p in problems)} disagreements between the readers",
    )
    assert counts["cases"] >= 600 and counts["rejected"] >= 500
    assert silent == 0, {k: dict(v) for k, v in per_kind.items() if k in always_bad}
    assert not problems, "\n".join(
        f"case {i} ({kind}): {what}: python {py} / c++ {cc}" for i, kind, what, py, cc in problems[:10]
    )


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100000 + "]" * 100000,  # deeper than Python's own recursion limit
        '{"format": "fastdiff.stepplan", "version": 1, "x": ' + "[" * 70 + "1" + "]" * 70 + "}",
        '{"a": ' * 70 + "1" + "}" * 70,
    ],
    ids=["arrays-100000", "in-a-plan-70", "objects-70"],
)
def test_deep_nesting_gets_the_same_message_from_both_readers(text):
    cpp = _cpp()
    with pytest.raises(PlanError) as py:
        StepPlan.loads(text)
    with pytest.raises(PlanError) as cc:
        cpp.parse_plan(text)
    assert str(py.value) == str(cc.value) and "nesting deeper than 64 at offset" in str(py.value)
