"""Settings of `fastdiff serve` (no Ray needed to read and check them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .api import Limits


@dataclass
class ServeSettings:
    """What `build` takes (every key optional): the models, how they run and batch, the caps."""

    models: list[str] = field(default_factory=lambda: ["tiny-shapes"])
    weights: dict[str, str] = field(default_factory=dict)  # model -> weights directory ("random", a student)
    device: str | None = None  # default: cuda when available
    dtype: str | None = None
    backend: str = "auto"
    replicas: int = 1  # per model, unless autoscaling is given
    autoscaling: dict | None = None  # Ray Serve autoscaling_config: min_replicas, max_replicas, target_ongoing_requests
    num_cpus: float = 1.0  # per model replica
    num_gpus: float = 0.0
    batching: bool = True
    max_batch_size: int = 8  # requests per batch
    batch_wait_timeout_s: float = 0.05
    max_queued_requests: int = -1  # per model deployment (Ray Serve's back-pressure); -1: unbounded
    limits: dict = field(default_factory=dict)  # Limits fields

    @classmethod
    def from_dict(cls, doc: dict | None) -> ServeSettings:
        doc = dict(doc or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(
                f"unknown serve settings {', '.join(unknown)}: expected some of {', '.join(sorted(known))}"
            )
        settings = cls(**doc)
        try:
            Limits(**settings.limits)  # names an unknown limit now, not on the replica
        except TypeError:
            known = ", ".join(f.name for f in fields(Limits))
            raise ValueError(f"unknown limits in {sorted(settings.limits)}: expected some of {known}") from None
        if isinstance(settings.models, str):
            settings.models = [settings.models]
        return settings


def read_settings(path) -> dict:
    """ServeSettings from a YAML or JSON file (`fastdiff serve --config`)."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the serve settings {path}: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(text)
    else:
        import json

        doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a mapping of serve settings")
    ServeSettings.from_dict(doc)
    return doc
