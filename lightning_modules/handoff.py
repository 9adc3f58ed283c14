"""Handoff by checkpoint: how a stage loads the model of the stage it builds on, and proves it is the same one.

Everything the next stage needs is in the upstream checkpoint (DESIGN.md, "Run folders"): the model's
``class_path`` and ``init_args`` and its weights. This module reads them, without the upstream
LightningModule, so no stage imports another:

* :func:`load_teacher` -> the teacher network (and its per-frame code corrections) of a teacher
  checkpoint; :func:`load_student` -> the student of a distillation checkpoint;
  :func:`load_code_corrections` -> the teacher's code corrections a distillation checkpoint carries.
* :func:`pin_upstream`: a downstream run (distillation on a teacher, GAR on a student) resolves its
  upstream once (``model.init_args.<key>``, or ``runs/<upstream>/latest``), records the file it
  resolved and the SHA-256 of its bytes (``<key>`` and ``<key>_sha256`` in its hyper-parameters, so in
  ``config.yaml``, every checkpoint and ``metrics.json`` as ``upstream/<stage>/{path,sha256}``), and every
  reload reads that record, never ``latest``: a distillation reloaded after a newer teacher fit binds
  the teacher it was trained on, and a missing or changed file is a one-line error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_modules.run_folder import UpstreamMissingError, upstream_checkpoint
from models.codes import FrameCodeCorrections

__all__ = [
    "NetworkEntryError",
    "UpstreamChangedError",
    "build_model",
    "build_student",
    "network_entry",
    "spec_parts",
    "class_from_path",
    "class_path_of",
    "datamodule_from_config",
    "file_sha256",
    "load_code_corrections",
    "load_student",
    "load_teacher",
    "pin_upstream",
    "read_checkpoint",
    "teacher_state_defaults",
]


class UpstreamChangedError(ValueError):
    """The upstream checkpoint a run recorded has changed since (the CLI prints it as one line)."""


def class_path_of(obj_or_class: Any) -> str:
    """``module.QualName`` of a class or of an instance's class (what ``class_path`` names)."""
    cls = obj_or_class if isinstance(obj_or_class, type) else type(obj_or_class)
    return f"{cls.__module__}.{cls.__qualname__}"


def class_from_path(class_path: str) -> type:
    """The class named by ``class_path`` (``package.module.Class``).

    Raises:
        ImportError: the module or the class does not exist (the message names the class path).
    """
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(f"cannot import class_path {class_path!r}: {err}") from err


def datamodule_from_config(config_path: str | os.PathLike):
    """Instantiate the datamodule of a run from its saved ``config.yaml`` (``data.class_path`` + ``init_args``).

    Raises:
        FileNotFoundError: no such config.
        ValueError: the config has no ``data.class_path``.
    """
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (a run folder's config.yaml)")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    if "class_path" not in data:
        raise ValueError(f"{path} has no data.class_path")
    return class_from_path(data["class_path"])(**(data.get("init_args") or {}))


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (cached per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _recorded_path(path: Path) -> Path:
    """The file itself (symlinks such as ``latest`` resolved), relative to the working directory when inside it."""
    real = path.resolve()
    try:
        return real.relative_to(Path.cwd().resolve())
    except ValueError:
        return real


def pin_upstream(
    path: str | os.PathLike | None, sha256: str | None, upstream: str, key: str, runs_root: str = "runs"
) -> tuple[Path, str]:
    """Resolve a stage's upstream checkpoint and check it against the run's record.

    Args:
        path: ``model.init_args.<key>``: the recorded or the user's path; None: ``runs/<upstream>/latest``.
        sha256: ``model.init_args.<key>_sha256``: the hash recorded when the run first resolved it, or
            None (a new run: nothing to check).
        upstream: the upstream stage (``teacher``, ``distill``).
        key: the init arg holding the path (named in the errors).
        runs_root: where ``<upstream>/latest`` lives.

    Returns:
        ``(file, sha256)``: the checkpoint file (``latest`` resolved to its run; relative to the
        working directory when inside it) and the hex SHA-256 of its bytes.

    Raises:
        UpstreamMissingError: the file does not exist (for a recorded one: the record is named).
        UpstreamChangedError: the file's bytes differ from the recorded hash.
    """
    if sha256 is not None and path is not None and not Path(path).is_file():
        raise UpstreamMissingError(
            f"the {upstream} checkpoint this run was trained on, {path} (sha256 {sha256[:12]}), is gone: restore it, "
            f"or bind another on purpose with --model.init_args.{key}=<ckpt> --model.init_args.{key}_sha256=null"
        )
    resolved = _recorded_path(upstream_checkpoint(path, upstream, key, runs_root))
    digest = file_sha256(resolved)
    if sha256 is not None and digest != sha256:
        raise UpstreamChangedError(
            f"the {upstream} checkpoint {resolved} changed since this run was trained on it (sha256 {digest[:12]}, "
            f"recorded {sha256[:12]}): restore it, or bind it on purpose with --model.init_args.{key}_sha256=null"
        )
    return resolved, digest


def read_checkpoint(source: str | os.PathLike | dict, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents: ``source`` loaded from disk, or ``source`` itself when it is already a
    loaded checkpoint (so a stage that needs several things from one file reads it once)."""
    if isinstance(source, dict):
        return source
    return torch.load(source, map_location=map_location, weights_only=False)


def teacher_state_defaults(state: dict[str, torch.Tensor], teacher: torch.nn.Module, prefix: str = "") -> None:
    """Fill, in place, the teacher buffers a checkpoint from before they existed lacks (canonical
    expression, expression scale) with their neutral values."""
    state.setdefault(f"{prefix}canonical_expression", torch.zeros_like(teacher.canonical_expression))
    state.setdefault(f"{prefix}expression_scale", torch.ones_like(teacher.expression_scale))


def load_teacher(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, FrameCodeCorrections | None]:
    """The teacher network and its per-frame code corrections of a teacher checkpoint (frozen, eval mode).

    Reads the checkpoint's ``teacher`` entry (``class_path``, ``init_args``), or for checkpoints
    written before it existed, builds :class:`models.teacher.PointAvatarTeacher` from the stage's
    hyper-parameters; the weights are the ``teacher.*`` rows of its state dict.

    Returns:
        ``(teacher, codes)``: ``codes`` is None when the teacher was fitted without code refinement.

    Raises:
        KeyError: the checkpoint holds no teacher (one line naming the command that makes one).
    """
    checkpoint = read_checkpoint(path, map_location)
    state = checkpoint.get("state_dict", {})
    if not any(k.startswith("teacher.") for k in state):
        raise KeyError(f"{path} holds no teacher: make one with `lightning fit --config experiments/teacher.yaml`")
    entry = checkpoint.get("teacher")
    if entry is None:  # the layout before the entry: the teacher's init args are among the stage's
        cls = class_from_path("models.teacher.PointAvatarTeacher")
        known = inspect.signature(cls).parameters
        init_args = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in known}
    else:
        cls, init_args = class_from_path(entry["class_path"]), dict(entry["init_args"])
    teacher = cls(**init_args)
    weights = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    teacher_state_defaults(weights, teacher)
    teacher.load_state_dict(weights)
    codes = FrameCodeCorrections.from_state_dict(state, "codes.")
    if codes is not None:
        codes.requires_grad_(False)
    return teacher.requires_grad_(False).eval(), codes


#: The student of a config that names none (and of checkpoints from before students had a class path).
DEFAULT_STUDENT = "models.student.Student"


class NetworkEntryError(ValueError, TypeError):
    """A network entry (``{class_path, init_args}``) that cannot be built as given; the message says what to change."""


def spec_parts(spec: Mapping[str, Any] | None, default: str, role: str = "model",
               bare_args: bool = False) -> tuple[str, dict[str, Any]]:
    """``(class_path, init_args)`` of a network entry as :func:`build_model` reads it: keys beside
    ``class_path`` / ``init_args`` (the command line's ``--model.init_args.<role>.<arg>``) override
    ``init_args``; None is ``default`` with its defaults.

    Args:
        bare_args: a dict without ``class_path`` is the init args of ``default`` (the student's entry
            before class paths); otherwise such a dict is refused.

    Raises:
        ValueError: an entry without ``class_path`` (a later config replaces an entry as a whole, so
            an override that names no class would silently drop the earlier config's init args).
    """
    spec = dict(spec or {})
    if spec and "class_path" not in spec and ("init_args" in spec or not bare_args):
        raise NetworkEntryError(f"the {role} entry has no class_path (a later config replaces a network entry as a whole): "
                         f"give its class_path and every init arg it needs in the last config")
    if "class_path" not in spec:
        return default, spec
    class_path = spec.pop("class_path")
    return class_path, {**(spec.pop("init_args", None) or {}), **spec}


def build_model(spec: Mapping[str, Any] | None, default: str, injected: Mapping[str, Any],
                base: type | None = None, role: str = "model", bare_args: bool = False) -> torch.nn.Module:
    """A new network from a config's ``{class_path, init_args}`` entry (students, the teacher's network,
    the GAR's generator, discriminator and encoder).

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``; other keys beside these two override
            ``init_args`` (where the command line's ``--model.init_args.<role>.<arg>=...`` puts them).
            A dict without ``class_path`` is the init args of ``default`` (configs written before
            class paths); None: ``default`` with its defaults.
        default: the class path used when ``spec`` names none.
        injected: init args the stage sets from elsewhere (sizes of the data or of the upstream model).
        base: the class the model must derive from (None: any).
        role: the config entry's name, for errors.
        bare_args: see :func:`spec_parts`.

    Returns:
        the model, with ``(class_path, init_args)`` recorded as ``model.spec`` for its checkpoint.

    Raises:
        ImportError: an unknown class path. TypeError: a class that is not a ``base``.
        ValueError: ``init_args`` setting an injected arg to another value than the stage's.
    """
    class_path, init_args = spec_parts(spec, default, role, bare_args)
    try:
        cls = class_from_path(class_path)
    except ImportError as err:
        raise NetworkEntryError(f"{role}: {err}") from None
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise NetworkEntryError(f"{role} class_path {class_path!r} is not a {class_path_of(base)} subclass")
    for key, value in injected.items():
        if key in init_args and init_args[key] != value:
            raise NetworkEntryError(f"{role}.init_args.{key}={init_args[key]!r} disagrees with the stage's {value!r} "
                             f"(set by the stage): remove it from the {role} entry")
    init_args.update(injected)
    try:
        model = cls(**init_args)
    except TypeError as err:  # an init arg the class does not take (or lacks)
        raise NetworkEntryError(f"{role} ({class_path}): {err}") from None
    model.spec = {"class_path": class_path, "init_args": init_args}
    return model


def network_entry(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint's entry for a network :func:`build_model` made: ``{class_path, init_args, **extra}``
    (what :func:`load_teacher` and :func:`load_student` build it from)."""
    return {"class_path": model.spec["class_path"], "init_args": dict(model.spec["init_args"]), **extra}


def build_student(spec: dict[str, Any] | None, expression_dim: int) -> torch.nn.Module:
    """A new student from a config's ``student`` entry (:func:`build_model`; the default
    :data:`DEFAULT_STUDENT`; any :class:`models.student.PointStudent`), E from the teacher.

    Raises:
        ImportError, TypeError, ValueError: as :func:`build_model`.
    """
    from models.student import PointStudent

    return build_model(spec, DEFAULT_STUDENT, {"expression_dim": expression_dim}, PointStudent, "student",
                       bare_args=True)


def load_student(path: str | os.PathLike | dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The student of a distillation checkpoint, without the teacher (GAR stage, export, benchmarks).

    Built from the checkpoint's ``student`` entry (``class_path`` and ``init_args``; entries without a
    class path are :class:`models.student.Student`), its batch-norm statistics recalibrated when the
    class can (exact statistics, also for checkpoints made before the stage did it). ``path``: the
    file, or its contents from :func:`read_checkpoint`.

    Raises:
        KeyError: the checkpoint holds no student (not made by the distillation stage).
    """
    checkpoint = read_checkpoint(path, map_location)
    if "student" not in checkpoint:
        raise KeyError(f"{'the checkpoint' if isinstance(path, dict) else path} holds no student: make one with `lightning fit --config experiments/distill.yaml`")
    entry = checkpoint["student"]
    student = class_from_path(entry.get("class_path", DEFAULT_STUDENT))(**entry["init_args"])
    student.load_state_dict(entry["state_dict"])
    recalibrate = getattr(student, "recalibrate_batchnorm", None)
    if callable(recalibrate):
        recalibrate()
    return student


def load_code_corrections(path: str | os.PathLike | dict,
                          map_location: str | torch.device = "cpu") -> FrameCodeCorrections | None:
    """The teacher's per-frame code corrections saved in a distillation checkpoint (``path``: the file or
    its contents from :func:`read_checkpoint`; frozen), or None when its teacher was fitted without
    code refinement (GAR stage)."""
    codes = FrameCodeCorrections.from_state_dict(read_checkpoint(path, map_location).get("state_dict", {}), "codes.")
    return codes.requires_grad_(False) if codes is not None else None
