"""Corrupt model directories (issue 23, part 1): seeded damage to copies of real small model
directories — the untrained tiny-shapes pipeline (`untrained_shapes_dir`), engines/digits and its
guidance-distilled student (copied, never modified) — loaded through `fastdiff.build_engine`.

A clear error is a ModelLoadError or ModelNotFoundError (fastdiff.models.loading) whose message
names the damaged directory; every damaged directory must end in one, never in another exception
type, a hang (60 s per case) or a load. Undamaged controls (and damage that leaves an equivalent
directory, such as a tokenizer without its redundant vocab.json) must load. Pickle weights are
refused unless allow_pickle=True, with which they load (the positive test).

Categories: truncated safetensors (every component, several lengths), header bytes flipped, a
tensor deleted, added or reshaped, config.json changes that change the weights' shapes, invalid
JSON, missing architecture keys, wrong types, pickle .bin instead of safetensors, missing
scheduler/tokenizer/weights files, damaged tokenizer, model_index.json and fastdiff.json.
Counted by tests/reliability/counts.py.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff.models.loading import ModelLoadError, ModelNotFoundError, engines_dir
from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

SEED = 23
LIMIT_S = 60
CLEAR = (ModelLoadError, ModelNotFoundError)
WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "guidance_embedding": "model.safetensors",
}
PICKLE = {
    "unet": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
}
# Components of each base directory: its weights and its configs.
COMPONENTS = {
    "tiny-shapes": ("unet", "vae", "text_encoder"),
    "digits": ("unet",),
    "student": ("unet", "guidance_embedding"),
}


# ---------------------------------------------------------------------------------- the bases
@pytest.fixture(scope="module")
def bases(untrained_shapes_dir, tmp_path_factory) -> dict[str, Path]:
    """Pristine copies of the three model directories (only what loading reads)."""
    root = tmp_path_factory.mktemp("model-bases")
    digits, student = engines_dir() / "digits", engines_dir() / "digits" / "students" / "guided"
    if not (digits / "unet").is_dir() or not (student / "guidance_embedding").is_dir():
        pytest.skip(f"the shipped digits model is missing from {digits}")
    shutil.copytree(untrained_shapes_dir, root / "tiny-shapes")
    for name, source, parts in (
        ("digits", digits, ("unet", "scheduler", "fastdiff.json")),
        ("student", student, ("unet", "scheduler", "guidance_embedding", "fastdiff.json")),
    ):
        for part in parts:
            (shutil.copytree if (source / part).is_dir() else shutil.copy)(source / part, root / name / part)
    return {name: root / name for name in COMPONENTS}


def build(base: str, directory: Path, *, form: int = 0, **kw):
    """build_engine over a case directory the way a user names it: tiny-shapes as a path or as
    weights= of the named model, digits and its student as weights=."""
    if base == "tiny-shapes" and form == 0:
        return fastdiff.build_engine(directory, device="cpu", **kw)
    return fastdiff.build_engine(
        "tiny-shapes" if base == "tiny-shapes" else "digits", weights=directory, device="cpu", **kw
    )


# ---------------------------------------------------------------------------------- damage
def _header_length(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


def truncate(component: str, where: str):
    def damage(d: Path, rng: random.Random) -> None:
        file = d / component / WEIGHTS[component]
        data = file.read_bytes()
        n = _header_length(file)
        cut = {
            "empty": 0,
            "in_length": rng.randrange(1, 8),
            "in_header": rng.randrange(8, 8 + n),
            "after_header": 8 + n,
            "in_data": rng.randrange(8 + n + 1, len(data) - 1),
            "last_byte": len(data) - 1,
        }[where]
        file.write_bytes(data[:cut])

    return damage


def flip_header(component: str, how: str):
    def damage(d: Path, rng: random.Random) -> None:
        file = d / component / WEIGHTS[component]
        data = bytearray(file.read_bytes())
        n = _header_length(file)
        if how == "length":  # the 8-byte header length
            data[rng.randrange(0, 4)] ^= rng.randrange(1, 256)
        elif how == "byte":  # never valid UTF-8 afterwards
            data[rng.randrange(8, 8 + n)] ^= 0xFF
        else:  # a digit of a shape or an offset becomes another digit: still valid JSON
            digits = [i for i in range(8, 8 + n) if chr(data[i]).isdigit()]
            i = rng.choice(digits)
            data[i] = ord(rng.choice([c for c in "0123456789" if c != chr(data[i])]))
        file.write_bytes(bytes(data))

    return damage


def edit_tensors(component: str, how: str):
    def damage(d: Path, rng: random.Random) -> None:
        from safetensors.torch import load_file, save_file

        file = d / component / WEIGHTS[component]
        tensors = load_file(file)
        key = rng.choice(sorted(tensors))
        if how == "deleted":
            del tensors[key]
        elif how == "added":
            tensors[key + "_extra"] = torch.zeros(3, dtype=tensors[key].dtype)
        else:  # reshaped: one more row
            t = tensors[key]
            tensors[key] = torch.zeros((t.shape[0] + 1, *t.shape[1:]) if t.dim() else (2,), dtype=t.dtype)
        save_file(tensors, file, metadata={"format": "pt"})

    return damage


def edit_json(relative: str, change):
    """change(doc, rng) edits the parsed JSON in place."""

    def damage(d: Path, rng: random.Random) -> None:
        file = d / relative
        doc = json.loads(file.read_text())
        change(doc, rng)
        file.write_text(json.dumps(doc, indent=1))

    return damage


def setter(key, value):
    def change(doc, rng):
        doc[key] = value(doc[key]) if callable(value) else value

    return change


def drop(*keys):
    def change(doc, rng):
        doc.pop(rng.choice(keys))

    return change


def invalid_json(relative: str):
    def damage(d: Path, rng: random.Random) -> None:
        file = d / relative
        text = file.read_text()
        file.write_text(rng.choice([text[: rng.randrange(1, len(text) - 1)], "", "{not json", "\xff\x00", "[1, 2"]))

    return damage


def to_pickle(component: str, keep_safetensors: bool = False):
    def damage(d: Path, rng: random.Random) -> None:
        from safetensors.torch import load_file

        file = d / component / WEIGHTS[component]
        torch.save(load_file(file), d / component / PICKLE[component])
        if not keep_safetensors:
            file.unlink()

    return damage


def remove(*relatives: str):
    def damage(d: Path, rng: random.Random) -> None:
        for relative in relatives:
            target = d / relative
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def no_change(d: Path, rng: random.Random) -> None:
    pass


def _wrong(value):
    """A JSON value of another type than value."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return "abc"
    return [value]


# ---------------------------------------------------------------------------------- the cases
def cases() -> list[tuple[str, str, str, object, bool]]:
    """(category, base, description, damage, bad): bad=False for the controls, which must load."""
    out = []

    def add(category, base, description, damage, bad=True):
        out.append((category, base, description, damage, bad))

    for base, components in COMPONENTS.items():
        for component in components:
            for where in ("empty", "in_length", "in_header", "after_header", "in_data", "last_byte"):
                add("truncated", base, f"{component} cut {where}", truncate(component, where))
            for how in ("length", "byte", "digit"):
                add("header_flipped", base, f"{component} header {how}", flip_header(component, how))
            add("tensor_changed", base, f"{component} tensor deleted", edit_tensors(component, "deleted"))
        add("control", base, "unchanged copy", no_change, bad=False)
    add("tensor_changed", "tiny-shapes", "text_encoder tensor added", edit_tensors("text_encoder", "added"))
    add("tensor_changed", "tiny-shapes", "vae tensor reshaped", edit_tensors("vae", "reshaped"))
    add("tensor_changed", "digits", "unet tensor added", edit_tensors("unet", "added"))
    add("tensor_changed", "student", "guidance tensor reshaped", edit_tensors("guidance_embedding", "reshaped"))

    # config.json changes that change the weights' shapes
    for base, relative, key, value in (
        ("tiny-shapes", "unet/config.json", "block_out_channels", [32, 96]),
        ("tiny-shapes", "unet/config.json", "layers_per_block", 2),
        ("tiny-shapes", "unet/config.json", "cross_attention_dim", 32),
        ("tiny-shapes", "unet/config.json", "in_channels", 8),
        ("tiny-shapes", "vae/config.json", "latent_channels", 8),
        ("tiny-shapes", "vae/config.json", "block_out_channels", [32, 64, 128]),
        ("tiny-shapes", "text_encoder/config.json", "hidden_size", 32),
        ("tiny-shapes", "text_encoder/config.json", "num_hidden_layers", 3),
        ("tiny-shapes", "text_encoder/config.json", "num_hidden_layers", 1),
        ("tiny-shapes", "text_encoder/config.json", "vocab_size", 600),
        ("tiny-shapes", "text_encoder/config.json", "max_position_embeddings", 32),
        ("digits", "unet/config.json", "num_class_embeds", 12),
        ("digits", "unet/config.json", "block_out_channels", [32, 96]),
        ("digits", "unet/config.json", "layers_per_block", 1),
        ("student", "guidance_embedding/config.json", "dim", 64),
        ("student", "guidance_embedding/config.json", "num_classes", 10),
    ):
        add("config_shapes", base, f"{relative} {key}={value}", edit_json(relative, setter(key, value)))

    for base, relative in (
        ("tiny-shapes", "unet/config.json"),
        ("tiny-shapes", "vae/config.json"),
        ("tiny-shapes", "text_encoder/config.json"),
        ("tiny-shapes", "scheduler/scheduler_config.json"),
        ("tiny-shapes", "tokenizer/tokenizer_config.json"),
        ("tiny-shapes", "tokenizer/tokenizer.json"),
        ("tiny-shapes", "model_index.json"),
        ("tiny-shapes", "fastdiff.json"),
        ("digits", "unet/config.json"),
        ("digits", "scheduler/scheduler_config.json"),
        ("digits", "fastdiff.json"),
        ("student", "guidance_embedding/config.json"),
    ):
        add("invalid_json", base, relative, invalid_json(relative))

    unet_keys = ("sample_size", "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim")
    for base, relative, keys in (
        ("tiny-shapes", "unet/config.json", unet_keys),
        ("tiny-shapes", "vae/config.json", ("latent_channels", "block_out_channels", "down_block_types")),
        ("tiny-shapes", "text_encoder/config.json", ("num_attention_heads", "hidden_size", "hidden_act")),
        ("tiny-shapes", "scheduler/scheduler_config.json", ("prediction_type", "beta_schedule")),
        ("digits", "unet/config.json", ("sample_size", "in_channels", "block_out_channels")),
        ("digits", "scheduler/scheduler_config.json", ("prediction_type", "num_train_timesteps")),
        ("student", "guidance_embedding/config.json", ("dim", "num_classes")),
        ("student", "fastdiff.json", ("student",)),  # a student directory without its student section
    ):
        for _ in range(2 if len(keys) > 2 else 1):
            add("missing_key", base, f"{relative} lacks one of {keys}", edit_json(relative, drop(*keys)))

    for base, relative, keys in (
        (
            "tiny-shapes",
            "unet/config.json",
            ("sample_size", "norm_eps", "act_fn", "flip_sin_to_cos", "attention_head_dim"),
        ),
        ("tiny-shapes", "vae/config.json", ("scaling_factor", "sample_size", "act_fn", "norm_num_groups")),
        ("tiny-shapes", "text_encoder/config.json", ("layer_norm_eps", "hidden_act", "num_attention_heads")),
        (
            "tiny-shapes",
            "scheduler/scheduler_config.json",
            ("beta_start", "clip_sample", "prediction_type", "steps_offset"),
        ),
        ("tiny-shapes", "fastdiff.json", ("default_guidance_scale",)),
        ("digits", "unet/config.json", ("num_class_embeds", "sample_size", "down_block_types")),
        ("digits", "scheduler/scheduler_config.json", ("num_train_timesteps", "beta_schedule", "clip_sample")),
        ("student", "guidance_embedding/config.json", ("dim", "features")),
    ):
        for i in range(2):
            add(
                "wrong_type",
                base,
                f"{relative}: a wrong type for one of {keys}",
                edit_json(relative, _wrong_type(keys)),
            )
    add(
        "wrong_type", "student", "fastdiff.json student.w_range", edit_json("fastdiff.json", _student("w_range", "1-5"))
    )

    for component in ("unet", "vae", "text_encoder"):
        add("pickle", "tiny-shapes", f"{component} as a pickle .bin", to_pickle(component))
    add("pickle", "digits", "unet as a pickle .bin", to_pickle("unet"))
    add(
        "pickle",
        "tiny-shapes",
        "unet .bin next to its safetensors (the safetensors loads)",
        to_pickle("unet", True),
        bad=False,
    )

    for base, relatives in (
        ("tiny-shapes", ("scheduler/scheduler_config.json",)),
        ("tiny-shapes", ("scheduler",)),
        ("tiny-shapes", ("tokenizer",)),
        ("tiny-shapes", ("tokenizer/tokenizer.json", "tokenizer/vocab.json")),
        ("tiny-shapes", ("tokenizer/tokenizer.json", "tokenizer/merges.txt")),
        ("tiny-shapes", ("tokenizer/tokenizer_config.json",)),
        ("tiny-shapes", ("unet/diffusion_pytorch_model.safetensors",)),
        ("tiny-shapes", ("text_encoder/config.json",)),
        ("tiny-shapes", ("vae",)),
        ("tiny-shapes", ("model_index.json",)),
        ("digits", ("scheduler",)),
        ("digits", ("unet/diffusion_pytorch_model.safetensors",)),
        ("digits", ("unet/config.json",)),
        ("student", ("guidance_embedding/model.safetensors",)),
    ):
        add("missing_file", base, " and ".join(relatives) + " removed", remove(*relatives))
    add(
        "missing_file",
        "tiny-shapes",
        "tokenizer/vocab.json removed (tokenizer.json has it)",
        remove("tokenizer/vocab.json"),
        bad=False,
    )

    tok = "tokenizer/tokenizer_config.json"
    add(
        "tokenizer",
        "tiny-shapes",
        "model_max_length past the positions",
        edit_json(tok, setter("model_max_length", 77)),
    )
    add("tokenizer", "tiny-shapes", "tokenizer.json truncated", _truncate_text("tokenizer/tokenizer.json"))
    add(
        "tokenizer",
        "tiny-shapes",
        "vocabulary larger than the embedding",
        _smaller_text_encoder,
    )
    for entry in (["diffusers", "NoSuchModel"], ["torch", "nn.Module"], None, ["transformers", "CLIPTokenizer"]):
        add("model_index", "tiny-shapes", f"unet = {entry}", edit_json("model_index.json", setter("unet", entry)))
    add(
        "model_index",
        "tiny-shapes",
        "model_index.json is a list",
        lambda d, rng: (d / "model_index.json").write_text("[]"),
    )
    add(
        "model_index",
        "tiny-shapes",
        "vae config names another class",
        edit_json("vae/config.json", setter("_class_name", "VQModel")),
    )
    add(
        "config_shapes",
        "tiny-shapes",
        "unet harmless key dropped (its default)",
        edit_json("unet/config.json", drop("act_fn")),
        bad=False,
    )
    return out


def _wrong_type(keys):
    def change(doc, rng):
        key = rng.choice(keys)
        doc[key] = _wrong(doc[key])

    return change


def _student(key, value):
    def change(doc, rng):
        doc["student"][key] = value

    return change


def _smaller_text_encoder(d: Path, rng: random.Random) -> None:
    """A text encoder embedding fewer tokens than the tokenizer has, weights and config agreeing."""
    from safetensors.torch import load_file, save_file

    file = d / "text_encoder" / WEIGHTS["text_encoder"]
    tensors = load_file(file)
    key = "embeddings.token_embedding.weight"
    tensors[key] = tensors[key][:100].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    edit_json("text_encoder/config.json", setter("vocab_size", 100))(d, rng)


def _truncate_text(relative):
    def damage(d: Path, rng: random.Random) -> None:
        text = (d / relative).read_text()
        (d / relative).write_text(text[: rng.randrange(10, len(text) - 10)])

    return damage


# ---------------------------------------------------------------------------------- the run
class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def outcome(base: str, directory: Path, form: int, **kw) -> tuple[str, str]:
    """("clear", message) | ("load", "") | ("crash", what) | ("hang", "")."""
    signal.alarm(LIMIT_S)
    try:
        build(base, directory, form=form, **kw)
    except _Timeout:
        return "hang", ""
    except CLEAR as exc:
        if str(directory) not in str(exc):
            return "crash", f"{type(exc).__name__} without the directory: {exc}"
        return "clear", str(exc)
    except Exception as exc:  # noqa: BLE001 - any other exception is a crash here
        return "crash", f"{type(exc).__name__}: {exc}"[:400]
    finally:
        signal.alarm(0)
    return "load", ""


def test_corrupt_model_directories_end_in_a_clear_error(bases, tmp_path):
    rng = random.Random(SEED)
    per_category: dict[str, Counter] = {}
    problems, results = [], []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, (category, base, description, damage, bad) in enumerate(cases()):
            directory = tmp_path / f"case-{i:03d}"
            shutil.copytree(bases[base], directory)
            damage(directory, rng)
            status, message = outcome(base, directory, form=i % 2)
            counts = per_category.setdefault(category, Counter())
            counts["cases"] += 1
            counts["bad" if bad else "valid"] += 1
            counts[status] += 1
            if status == "load" and bad:
                counts["silent_load"] += 1
            results.append((i, category, base, description, status, message[:200]))
            if status in ("crash", "hang") or (status == "load") == bad:
                problems.append((i, category, base, description, status, message))
            shutil.rmtree(directory)
    finally:
        signal.signal(signal.SIGALRM, old)

    total = Counter()
    for c in per_category.values():
        total.update(c)
    record(
        "model_dirs",
        "model directories",
        cases=total["cases"],
        bad_inputs=total["bad"],
        clear_errors=total["clear"],
        loads=total["load"] - total["silent_load"],
        crashes=total["crash"],
        silent_loads=total["silent_load"],
        hangs=total["hang"],
        per_category={k: dict(v) for k, v in sorted(per_category.items())},
    )
    assert total["bad"] >= 60 and len(per_category) >= 10, dict(total)
    assert total["crash"] == 0 and total["hang"] == 0 and total["silent_load"] == 0, problems[:10]
    assert not problems, "\n".join(f"case {p[0]} ({p[1]}, {p[2]}: {p[3]}): {p[4]} {p[5][:300]}" for p in problems)


def test_pickle_weights_are_refused_by_default_and_load_when_allowed(bases, tmp_path):
    """The refusal names the file found, the safetensors file expected and the opt-in; with
    allow_pickle=True the same directory loads, with the same weights."""
    directory = tmp_path / "pickled"
    shutil.copytree(bases["tiny-shapes"], directory)
    to_pickle("unet")(directory, random.Random(0))
    with pytest.raises(ModelLoadError) as refused:
        fastdiff.build_engine(directory, device="cpu")
    message = str(refused.value)
    assert str(directory / "unet" / "diffusion_pytorch_model.bin") in message
    assert "diffusion_pytorch_model.safetensors" in message and "allow_pickle=True" in message
    assert "--allow-pickle" in message and "arbitrary code" in message

    engine = fastdiff.build_engine(directory, device="cpu", allow_pickle=True)
    reference = fastdiff.build_engine(bases["tiny-shapes"], device="cpu")
    for (name, a), (_, b) in zip(engine.unet.state_dict().items(), reference.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    record("model_dirs", "model directories", cases=2, bad_inputs=1, clear_errors=1, loads=1)


def test_the_cli_refuses_pickle_weights_without_allow_pickle(bases, tmp_path, capsys):
    from fastdiff import cli

    directory = tmp_path / "pickled"
    shutil.copytree(bases["digits"], directory)
    to_pickle("unet")(directory, random.Random(0))
    argv = ["sample", "3", "--model", "digits", "--weights", str(directory), "--device", "cpu", "--steps", "2"]
    argv += ["--seed", "0", "--out", str(tmp_path / "out.png")]
    assert cli.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "diffusion_pytorch_model.bin is a pickle file" in err and "--allow-pickle" in err
    assert not (tmp_path / "out.png").exists()
    assert cli.main([*argv, "--allow-pickle"]) == 0 and (tmp_path / "out.png").is_file()
    assert "--allow-pickle" in _help("sample") and "arbitrary code" in _help("sample")
    record("model_dirs", "model directories", cases=2, bad_inputs=1, clear_errors=1, loads=1)


def _help(command: str) -> str:
    from fastdiff import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return " ".join(sub.choices[command].format_help().split())


def test_the_shipped_configs_pass_the_strict_checks():
    """No false refusals: the real SD 2.1 configs (engines/sd21, diffusers 0.10 era) and the shipped
    models' configs pass the architecture-key and type checks."""
    import diffusers
    import transformers

    from fastdiff.models.loading import check_config, check_model_component, check_scheduler_config

    roots = [engines_dir() / "sd21", engines_dir() / "tiny-shapes", engines_dir() / "digits"]
    roots += sorted(p for p in (engines_dir() / "digits" / "students").glob("*") if p.is_dir())
    checked = 0
    for root in roots:
        if not root.is_dir():
            continue
        for component in ("unet", "vae"):
            file = root / component / "config.json"
            if file.is_file():
                config = json.loads(file.read_text())
                check_config(file, getattr(diffusers, config["_class_name"]), config)
                checked += 1
        if (root / "text_encoder" / "model.safetensors").is_file():
            check_model_component(root / "text_encoder", transformers.CLIPTextModel)
            checked += 1
        check_scheduler_config(root / "scheduler" / "scheduler_config.json")
        checked += 1
    assert checked >= 6


def test_a_scheduler_config_older_than_prediction_type_means_epsilon(tmp_path):
    """SD 1.x's scheduler configs (diffusers 0.6) predate prediction_type: they load; a config
    written by a diffusers that always writes it and lacks it is damaged."""
    from fastdiff.models.loading import check_scheduler_config

    config = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "skip_prk_steps": True,
    }
    file = tmp_path / "scheduler_config.json"
    file.write_text(json.dumps(config))
    assert check_scheduler_config(file)["_class_name"] == "PNDMScheduler"
    file.write_text(json.dumps(dict(config, _diffusers_version="0.21.0")))
    with pytest.raises(ModelLoadError, match="lacks prediction_type"):
        check_scheduler_config(file)
