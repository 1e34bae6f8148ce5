"""The reliability suite's counts: each test module records its cases here, and
`make test-reliability` prints the table (`python -m tests.reliability.counts DIR`).

A record is one JSON file per suite in $FASTDIFF_RELIABILITY_OUT (nothing is written when it is
unset) with the same columns for every suite:

    cases         inputs or runs tried
    bad_inputs    of them, inputs that must be refused (they count toward the issue's 500)
    clear_errors  bad inputs refused with a clear error (or the documented fallback taken)
    loads         inputs that loaded (valid ones: a fuzzed change that leaves a valid file)
    crashes       any other exception, a signal or a non-zero exit without a message
    silent_loads  bad inputs that loaded (or ran) as if they were good
    hangs         cases past their time limit
    identical     for runs compared with a reference run (concurrency, kill/resume): how many
                  gave the same result; None where it does not apply
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fastdiff.files import atomic_write

COLUMNS = ("cases", "bad_inputs", "clear_errors", "loads", "crashes", "silent_loads", "hangs", "identical")


def record(suite: str, title: str, **counts) -> dict:
    """Write (or add to) the suite's record; returns it. counts: any of COLUMNS, plus free-form
    extra keys (e.g. per_category) that are stored as given."""
    unknown = set(counts) - set(COLUMNS) - {"per_category", "results", "notes"}
    if unknown:
        raise ValueError(f"unknown count columns {sorted(unknown)}; expected {COLUMNS}")
    doc = {"suite": suite, "title": title, **{c: 0 for c in COLUMNS}, "identical": None}
    out = os.environ.get("FASTDIFF_RELIABILITY_OUT")
    path = Path(out) / f"{suite}.json" if out else None
    if path is not None and path.is_file():
        doc = json.loads(path.read_text())
    for key, value in counts.items():
        if key in COLUMNS and value is not None:
            doc[key] = (doc.get(key) or 0) + value
        elif key not in COLUMNS:
            doc[key] = value
    if path is not None:
        atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return doc


def table(directory: str | os.PathLike) -> str:
    """The markdown table of every record in directory, with totals."""
    docs = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    head = "| suite | cases | bad inputs | clear errors | loads | crashes | silent loads | hangs | identical |"
    lines = [head, "|---|" + "---|" * 8]
    total = {c: 0 for c in COLUMNS}
    for d in docs:
        cells = []
        for c in COLUMNS:
            v = d.get(c)
            cells.append("–" if v is None else str(v))
            total[c] += v or 0
        lines.append(f"| {d.get('title', d['suite'])} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    directory = Path(argv[0] if argv else "build/reliability")
    if not any(directory.glob("*.json")):
        print(f"no reliability records in {directory}: run `make test-reliability`", file=sys.stderr)
        return 1
    print(table(directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
