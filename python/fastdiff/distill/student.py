"""Guidance-conditioned students: made from a teacher's UNet, saved as a model directory.

A student is the teacher's UNet plus an input for the guidance weight w (Meng et al. 2023, §3,
stage 1: a Fourier embedding of w added to the time embedding), initialised so that it starts as
the teacher's conditional model:

- a UNet2DConditionModel gets `time_cond_proj_dim` (diffusers' own w input, which
  StableDiffusionPipeline fills from its guidance_scale, so the student also samples in an
  unmodified diffusers pipeline, one UNet call per step); its projection starts at zero;
- a class-conditional UNet2DModel (digits) gets class_embed_type="identity" and a
  `ClassGuidanceEmbedding` (the teacher's class table + an MLP of w, zero at first) that makes its
  conditioning vector; the UNet directory still loads with diffusers' UNet2DModel.

A student directory is the teacher's model directory (its scheduler/ and, for text models, text
encoder, tokenizer and VAE) with the student's unet/ (float32 or float16 safetensors),
guidance_embedding/ (class-conditional students) and fastdiff.json with a "student" section
(stage, w range, teacher, steps and its plans). It loads with `build_engine(model, weights=DIR)`
(`fastdiff.models.loading.student_conditioner`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..engines.components import ClassGuidanceEmbedding, guidance_features
from ..files import replace_entries
from .train import DistillError

FEATURES = 256  # sinusoidal features of w (LCM's and diffusers' time_cond_proj_dim for w)


class Student(torch.nn.Module):
    """The trainable student: its UNet and, for a class-conditional UNet2DModel, the embedding
    that turns (class, w) into the UNet's class vector. forward(z, t, cond, w) -> raw output,
    cond the teacher conditioner's tensors, w the guidance weight per sample (diffusers'
    convention: 1 = no guidance)."""

    def __init__(self, unet: torch.nn.Module, embedding: ClassGuidanceEmbedding | None = None):
        super().__init__()
        self.unet = unet
        self.embedding = embedding

    def conditioning(self, cond: dict, w: torch.Tensor) -> dict:
        if self.embedding is not None:
            return {**cond, "class_labels": self.embedding(cond["class_labels"], w)}
        dim = self.unet.config.time_cond_proj_dim
        return {**cond, "timestep_cond": guidance_features(w, dim).to(next(self.unet.parameters()).dtype)}

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: dict, w: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, **self.conditioning(cond, w), return_dict=False)[0]


def make_student(teacher_unet: torch.nn.Module, seed: int = 0) -> Student:
    """A student initialised from the teacher's UNet (a deep copy; the teacher is untouched), in
    float32. Its output at any w equals the teacher's conditional output until it is trained. The
    new layers' initialisation draws from `seed` (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _make_student(teacher_unet)


def _make_student(teacher_unet: torch.nn.Module) -> Student:
    import diffusers

    teacher_unet = copy.deepcopy(teacher_unet).float()
    state = teacher_unet.state_dict()
    config = dict(teacher_unet.config)
    cls = type(teacher_unet)
    if isinstance(teacher_unet, diffusers.UNet2DConditionModel):
        if config.get("time_cond_proj_dim") is not None:
            raise DistillError("the teacher already takes a guidance input (time_cond_proj_dim): it is a student")
        config["time_cond_proj_dim"] = FEATURES
        unet = cls.from_config(config)
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise DistillError(f"the student does not match the teacher: missing {missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
        return Student(unet.float())
    if isinstance(teacher_unet, diffusers.UNet2DModel):
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is None:
            raise DistillError(
                "guided distillation of a UNet2DModel needs a class-conditional teacher (num_class_embeds, "
                f"class_embed_type None), got class_embed_type={config.get('class_embed_type')!r}, "
                f"num_class_embeds={config.get('num_class_embeds')!r}"
            )
        table = state.pop("class_embedding.weight")
        config["class_embed_type"], config["num_class_embeds"] = "identity", None
        unet = cls.from_config(config)
        unet.load_state_dict(state, strict=True)
        embedding = ClassGuidanceEmbedding(table.shape[0], table.shape[1], FEATURES)
        with torch.no_grad():
            embedding.classes.weight.copy_(table)
        return Student(unet.float(), embedding)
    raise DistillError(
        f"guided distillation supports diffusers UNet2DConditionModel and UNet2DModel, got {cls.__name__}"
    )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes), 16 hex digits:
    what a resumed run checks its teacher against."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def save_student(student: Student, out, *, teacher_dir, info: dict, dtype=torch.float32) -> Path:
    """Write the student's model directory (see the module doc): the teacher directory's
    scheduler/ and fastdiff.json (with info under "student"), the student's unet/ and
    guidance_embedding/ in `dtype`. Everything is written into a staging directory first and moved
    into `out` entry by entry, fastdiff.json (what makes it a student directory) last: a kill
    leaves no half-written file in `out` (`fastdiff.files.replace_entries`)."""
    from safetensors.torch import save_file

    final, teacher_dir = Path(out), Path(teacher_dir)
    final.mkdir(parents=True, exist_ok=True)
    out = final / ".staging"
    if out.exists():  # left by a kill
        shutil.rmtree(out)
    out.mkdir()
    unet = copy.deepcopy(student.unet).to(dtype)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if student.embedding is not None:
        (out / "guidance_embedding").mkdir(exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in student.embedding.state_dict().items()}
        save_file(state, out / "guidance_embedding" / "model.safetensors")
        config = json.dumps(student.embedding.config, indent=1, sort_keys=True) + "\n"
        (out / "guidance_embedding" / "config.json").write_text(config)
    for part in ("scheduler", "text_encoder", "tokenizer", "vae"):
        if (teacher_dir / part).is_dir():
            shutil.copytree(teacher_dir / part, out / part)
    for name in ("model_index.json",):
        if (teacher_dir / name).is_file():
            shutil.copy(teacher_dir / name, out / name)
    base = json.loads((teacher_dir / "fastdiff.json").read_text()) if (teacher_dir / "fastdiff.json").is_file() else {}
    base.pop("student", None)
    (out / "fastdiff.json").write_text(json.dumps({**base, "student": info}, indent=1, sort_keys=True) + "\n")
    return replace_entries(out, final, last=("fastdiff.json",))


def load_student(directory) -> tuple[Student, dict]:
    """The trainable Student (float32, CPU) of a student directory and its "student" info."""
    import diffusers

    from ..models.loading import load_guidance_embedding, model_info

    directory = Path(directory)
    info = model_info(directory).get("student")
    if info is None:
        raise DistillError(f"{directory} is not a student directory (no 'student' section in its fastdiff.json)")
    config = json.loads((directory / "unet" / "config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls not in (diffusers.UNet2DModel, diffusers.UNet2DConditionModel):
        raise DistillError(f"{directory / 'unet'} holds a {config.get('_class_name')!r}, not a diffusers UNet")
    unet = cls.from_pretrained(directory / "unet", torch_dtype=torch.float32)
    embedding = None if unet.config.get("class_embed_type") != "identity" else load_guidance_embedding(directory)
    return Student(unet, embedding), info


def export_student(directory, out, *, dtype=torch.float16) -> Path:
    """A student directory to ship: its weights in `dtype` (float16 halves the size), its plans,
    and its run's settings, loss log and done record, without the training checkpoint."""
    directory, out = Path(directory), Path(out)
    student, info = load_student(directory)
    save_student(student, out, teacher_dir=directory, info=info, dtype=dtype)
    if (directory / "plans").is_dir():
        shutil.copytree(directory / "plans", out / "plans", dirs_exist_ok=True)
    (out / "run").mkdir(exist_ok=True)
    for name in ("settings.json", "log.jsonl", "done.json"):
        if (directory / "run" / name).is_file():
            shutil.copy(directory / "run" / name, out / "run" / name)
    return out
