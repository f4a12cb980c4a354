"""Checkpoints of a training run: written atomically, verified by a checksum manifest, resumable.

Layout: <output_dir>/checkpoints/step-00000040/
  trainable.safetensors   full values of every trainable parameter (ZeRO-3 shards gathered)
  ds/                     DeepSpeed's own files: optimizer state (partitioned per rank under ZeRO 1-3)
                          and LR scheduler; frozen backbone parameters are excluded
  rng-rank<r>.json        python / numpy / torch RNG state of each rank
  teacher-rank<r>.safetensors  the teacher vectors each rank has computed (the alignment pairs, or only the
                          log's probes with alignment off), so a resumed run computes exactly what the
                          uninterrupted one would
  state.json              step, data-order position, early-stopping state, bad-step count
  manifest.json           sha256 and size of every file above; written last

A checkpoint is assembled in a hidden temporary folder and renamed into place only once every rank has
written its part and the manifest exists, so a crash (or a full disk) never leaves a half-written `step-*`
folder; a failed write says which checkpoint is the last good one. Nothing non-finite is ever written.
`train.resume=auto` takes the newest folder whose manifest verifies; a corrupted one is reported in one
line and the previous complete one is used instead; when none verifies the run stops (it never starts
over silently). A checkpoint that does not verify is never deleted or overwritten: a later save of the
same step moves it aside to `step-XXXXXXXX.corrupt`.

Loading never unpickles arbitrary objects: DeepSpeed's files are read with `torch.load(weights_only=True)`
and an allow-list of the few DeepSpeed classes they hold (`DS_SAFE_GLOBALS`). The sha256 manifest guards
against corruption, the allow-list against a tampered file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsxfer.errors import DsxferError
from dsxfer.files import sha256_file
from dsxfer.method import trainable
from dsxfer.method.trainable import TRAINABLE_FILE, NonFiniteError, check_finite  # noqa: F401  (checkpoint errors)
from dsxfer.training import engine as eng

MANIFEST = "manifest.json"
STATE = "state.json"
DS_DIR = "ds"
DS_TAG = "state"
PREFIX = "step-"


class CheckpointError(DsxferError):
    """A checkpoint that cannot be used (missing, incomplete, corrupted or unsafe) or cannot be written."""


@dataclass
class TrainState:
    """The run's position: what the loop updates and exactly what a checkpoint's state.json holds."""

    step: int = 0                       # optimizer steps done
    task_pos: int = 0                   # DataOrder positions: a resumed run reads on where the saved one was
    align_pos: int = 0
    micro: int = 0                      # micro-batches drawn (pairs ride along every alignment.every of them)
    bad_steps: int = 0                  # skipped micro-batches and DeepSpeed-skipped steps (train.max_bad_steps)
    best_score: float | None = None     # early stopping on the source dev set
    best_step: int | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "TrainState":
        """From a state.json; keys this version does not know are ignored, missing ones keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------ save


def save(engine, output_dir: str | Path, state: TrainState, keep_last: int) -> Path:
    """Write checkpoint `state.step` (every rank calls this) and keep only the newest `keep_last`.

    Raises NonFiniteError (nothing written) for NaN/Inf trainable values, and CheckpointError naming the
    last good checkpoint when the disk refuses a write (full, read-only, no permission).
    """
    from safetensors.torch import save_file

    step = state.step
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    r = eng.rank()
    values = trainable.gather(engine.module)  # every rank joins the ZeRO-3 gather
    teacher = getattr(engine.module, "teacher_cache", None)
    check_finite(values, f"checkpoint {final}")  # the same values on every rank: all raise alike

    def agreed(phase) -> None:
        """Run one phase of the write on every rank; if it failed anywhere, every rank stops with the cause."""
        error = None
        try:
            phase()
        except OSError as e:
            error = e
        if eng.all_ranks_max(1.0 if error else 0.0) > 0:
            if r == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            good = complete_checkpoints(output_dir)
            cause = f"{error.strerror or error} ({error.filename or tmp})" if error else "another rank could not write its part"
            raise CheckpointError(f"could not write checkpoint {final}: {cause}; the last good checkpoint is "
                                  f"{good[-1] if good else 'none (no checkpoint was written before)'}; free disk space or fix "
                                  "permissions, then resume with train.resume=auto")

    def prepare() -> None:
        if r == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash: never trusted
            tmp.mkdir()

    def write_parts() -> None:
        # optimizer + scheduler (each rank writes its own ZeRO partition); frozen weights are not ours to save
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        (tmp / f"rng-rank{r}.json").write_text(json.dumps(rng_state()))
        if teacher is not None and len(teacher):  # this rank's teacher vectors: a resume recomputes none of them
            save_file(teacher.state(), str(tmp / f"teacher-rank{r}.safetensors"))
        if r == 0:
            trainable.write(values, tmp / TRAINABLE_FILE, metadata={"step": str(step)})
            (tmp / STATE).write_text(json.dumps(asdict(state), indent=1))

    def publish() -> None:
        if r != 0:
            return
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "world_size": eng.world_size(),
                    "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            try:
                verify(final)
                shutil.rmtree(final)  # our own complete checkpoint of this step (an earlier trajectory)
            except CheckpointError:
                os.replace(final, _aside(final))  # never overwrite what we could not verify
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    agreed(prepare)
    agreed(write_parts)
    agreed(publish)
    return final


def _aside(path: Path) -> Path:
    """A free name `<path>.corrupt` (then .corrupt-2, ...) for a checkpoint kept for inspection."""
    candidate, n = path.with_name(path.name + ".corrupt"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{n}")
    return candidate


# ------------------------------------------------------------------------------------ find / verify


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Renamed (hence complete) checkpoint folders, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing or whose checksum is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete; delete it or resume from another one")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable; delete the folder or resume from another one") from None
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} listed in {MANIFEST} is missing; the checkpoint is corrupted")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its sha256 in {MANIFEST}; the checkpoint is corrupted")


def resolve_resume(output_dir: str | Path, resume: str | None, log=print) -> Path | None:
    """The checkpoint to resume from: None (fresh run), an explicit folder (must verify), or 'auto'.

    'auto' walks from the newest complete checkpoint backwards and takes the first that verifies,
    reporting each corrupted one it skips; None when there is no checkpoint at all (a fresh run). When
    checkpoints exist but none verifies it stops: starting over would silently lose the run.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={resume}: no such checkpoint folder (use a {PREFIX}* folder under {checkpoint_dir(output_dir)} or 'auto')")
        verify(path)
        return path
    found = list(reversed(complete_checkpoints(output_dir)))
    for path in found:
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log(f"warning: {e}; falling back to the previous checkpoint")
    if found:
        raise CheckpointError(
            f"train.resume=auto: none of the {len(found)} checkpoint(s) in {checkpoint_dir(output_dir)} verifies, so there is "
            "nothing to resume from (nothing was loaded or changed); restore them, or start a fresh run with "
            "train.resume=null and train.overwrite=true (deletes them) or another train.output_dir")
    return None


# ------------------------------------------------------------------------------------ load


def load(engine, path: str | Path) -> TrainState:
    """Restore trainable parameters, optimizer, scheduler and this rank's RNG; return the saved TrainState."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("world_size") != eng.world_size() and engine.zero_optimization_stage() > 0:
        raise CheckpointError(f"checkpoint {path} was written by {manifest.get('world_size')} ranks under ZeRO-{engine.zero_optimization_stage()}; "
                              f"resume it with the same number of ranks (now {eng.world_size()})")
    with weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not read {DS_DIR}/{DS_TAG}; the checkpoint is corrupted")
    # the safetensors file is the authority for parameter values (DeepSpeed restores them from its
    # fp32 partitions under ZeRO 1-3, but not from excluded-frozen module states under ZeRO-0 alike)
    trainable.load(engine.module, trainable.read(path / TRAINABLE_FILE), source=f"checkpoint {path}")
    r = eng.rank()
    teacher = getattr(engine.module, "teacher_cache", None)
    if teacher is not None and (path / f"teacher-rank{r}.safetensors").is_file():
        teacher.load_state(load_file(str(path / f"teacher-rank{r}.safetensors")))
    rng_file = path / f"rng-rank{r}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return TrainState.from_json(json.loads((path / STATE).read_text()))


def ds_safe_globals() -> list[type]:
    """The only non-tensor classes in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(engine):
    """While DeepSpeed loads a checkpoint, its checkpoint engine reads files with weights_only=True.

    Every DeepSpeed checkpoint read goes through `engine.checkpoint_engine.load`, which calls torch.load
    with weights_only=False; this swaps in a restricted load for the duration (on this engine only).
    """
    checkpoint_engine = engine.checkpoint_engine
    allowed = ds_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            what = (f"the Python object {found.group(1)}" if found else
                    f"pickle content outside tensors and plain data ({reason.group(1).strip()})" if reason else "Python objects")
            raise CheckpointError(
                f"checkpoint file {path} holds {what}, which no checkpoint written by dsxfer contains; it was not "
                "loaded (dsxfer never unpickles arbitrary objects). Someone changed this file: delete the checkpoint "
                "folder, or resume from another one") from None

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load  # the class's own method again
