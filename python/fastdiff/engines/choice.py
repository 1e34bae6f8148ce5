"""plans/auto.json, the file sampler="auto" follows: per step count, the sampler measured best
on validation samples and the hashes of the plans compared (written by
`fastdiff.calibration.choice.choose_default`, read by `Engine.resolve_sampler`)."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "fastdiff.auto"
VERSION = 1


class ChoiceError(ValueError):
    """A plans/auto.json that cannot be read or is not a choice file."""


def save_choice(doc: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_choice(path) -> dict:
    """Read a plans/auto.json; ChoiceError names the file and what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ChoiceError(f"{path}: cannot read the sampler choice: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ChoiceError(f"{path}: not a sampler choice file: format {got!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise ChoiceError(f"{path}: sampler choice version {doc.get('version')!r}, this fastdiff reads {VERSION}")
    choices = doc.get("choices")
    ok = isinstance(choices, dict) and all(
        isinstance(c, dict) and isinstance(c.get("sampler"), str) and isinstance(c.get("hashes"), dict)
        for c in choices.values()
    )
    if not ok:
        raise ChoiceError(f"{path}: corrupt sampler choice: 'choices' must map step counts to {{sampler, hashes}}")
    return doc
