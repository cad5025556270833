"""Checkpoints: atomic writes, and loading that never runs code from the file.

``save_checkpoint`` stores plain types and tensors only, written atomically; ``read_checkpoint`` /
``load_checkpoint`` read them with ``torch.load(weights_only=True)`` after refusing, without
unpickling them, files that would need arbitrary unpickling.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import pickle
import pickletools
import secrets
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .models import build_model
from .presets import TrainConfig, takes_parametrization


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "lipnet.checkpoint"
CHECKPOINT_VERSION = 3  # 1: {config, state_dict, history}, pickled without restriction; 2: + epoch, training;
# 3: config["privacy"] (PrivacyConfig fields) and the private optimizer in config["optimizer"], instead of config["dp"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, truncated or not a checkpoint at all, holding
    objects that only arbitrary (code-running) unpickling could rebuild -- refused without
    unpickling them -- or lacking what the caller needs (e.g. the training state to resume)."""


@dataclass
class Checkpoint:
    """A checkpoint's content as :func:`read_checkpoint` returns it (nothing in it ran code to load)."""

    path: Path                          # the checkpoint file
    config: TrainConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the model's
    history: list[dict] = field(repr=False)  # one row per completed epoch (rank 0's)
    epoch: int                          # epochs completed when it was written
    # {"optimizer", "scheduler", "scaler": state_dicts, "rng": {stream: [state per rank] | None},
    #  "world_size"}; a private run's: {"optimizer", "private": PrivateTrainer.state_dict(), "world_size"};
    # None: weights only (not resumable)
    training: dict | None = field(default=None, repr=False)

    @property
    def resumable(self) -> bool:
        """True if it holds the training state :func:`fit` needs to continue the run."""
        return self.training is not None

    def check_resumable(self, world_size: int) -> None:
        """Raise unless :func:`lipnet.training.fit` can continue this run with ``world_size``
        processes: a training state must be stored, and the run must have had as many processes
        (the per-rank random streams and batch statistics depend on it)."""
        if self.training is None:
            raise CheckpointError(f"{self.path} holds weights only (no optimizer / scheduler / RNG states): it cannot "
                                  "be resumed (written by an older lipnet or by save_checkpoint without training state)")
        trained_by = self.training.get("world_size", 1)
        if trained_by != world_size:
            raise ValueError(f"{self.path} was trained by {trained_by} process(es); resume it with --nproc {trained_by} "
                             f"(got {world_size})")


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` rebuilt from plain types (dict, list, tuple, str, int, float, bool, None) and tensors,
    which ``torch.load(weights_only=True)`` loads without running code: number-likes (e.g. numpy
    scalars) become int / float, dict / list / tuple subclasses the base type; anything else is a
    TypeError naming ``where`` it is."""
    if type(obj) in _PLAIN_SCALARS or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    raise TypeError(f"save_checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints "
                    "hold only dict / list / tuple / str / int / float / bool / None and tensors, so that loading "
                    "them never needs arbitrary unpickling")


def _unsafe_globals(file: Path | IO[bytes]) -> list[str]:
    """The pickle globals of a torch zip archive that ``weights_only=True`` would refuse, found by
    disassembling the pickle (nothing is executed); [] if torch cannot tell (torch < 2.5)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    return list(scan(file if not isinstance(file, Path) else str(file))) if scan is not None else []


def _raw_pickle_globals(f: IO[bytes]) -> list[str] | None:
    """The globals named by the pickle(s) at the start of ``f`` (a pre-zip ``torch.save`` file or a
    bare ``pickle.dump``), by static disassembly (``pickletools``: nothing is executed); None if
    ``f`` does not start with a pickle. Torch's own rebuild functions are left out."""
    found: list[str] = []
    parsed = False
    while True:
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # not (or no longer) pickle data: tensor bytes of a legacy file, garbage
            break
        parsed = True
        position = f.tell()
        if not f.read(1):  # end of file
            break
        f.seek(position)
    if not parsed:
        return None
    return sorted({g for g in found if not (g.startswith("torch.") or g == "collections.OrderedDict")})


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable on POSIX; directories cannot be opened this way on Windows
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], verify: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` by what ``write`` writes, all or nothing: into a temporary file of the same
    directory, flushed and fsynced, checked by ``verify`` (it raises to refuse), then renamed over
    ``path`` (``os.replace``, atomic). A reader, or a crash at any point, sees the old file or the
    new one, never a partial one; on failure the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _refuse_unsafe(tmp: Path) -> None:
    unsafe = _unsafe_globals(tmp)
    if unsafe:
        raise TypeError(f"save_checkpoint: the state holds objects ({', '.join(unsafe)}) that load_checkpoint would "
                        "refuse (they need arbitrary unpickling); nothing was written")


def _cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_checkpoint(out: str | Path, model: nn.Module, config: TrainConfig, history: Sequence[dict] = (), *,
                    epoch: int | None = None, training: dict | None = None,
                    weights_dtype: torch.dtype | None = None) -> Path:
    """Write ``out/checkpoint.pt`` (the model's state_dict, the config to rebuild it, the history)
    and ``out/config.json`` (config and history, for people); returns the checkpoint's path.

    Each file is replaced atomically (written to a temporary file in ``out``, flushed and fsynced,
    then ``os.replace``d): a run killed at any moment leaves the previous complete checkpoint or the
    new one. Everything is stored as plain types and tensors,
    so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``; a config, history or
    ``training`` holding anything else is a TypeError and nothing is written. ``epoch``: epochs
    completed (default ``len(history)``); ``training``: the state :func:`fit` resumes from (fit
    builds it; None: a weights-only checkpoint). ``weights_dtype`` (e.g. ``torch.float16``, for
    shipping): the state_dict's floating tensors are stored in it; loading copies them back into the
    model's own dtype (its orthogonal layers then retract the rounded factors before first use)."""
    if weights_dtype is not None and training is not None:
        raise ValueError("weights_dtype is for weights-only checkpoints: a resumable one keeps the exact weights")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _plain(asdict(config), "config")
    rows = _plain(list(history), "history")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg,
               "state_dict": _cast_floating(model.state_dict(), weights_dtype), "history": rows,
               "epoch": len(rows) if epoch is None else int(epoch),
               "training": None if training is None else _plain(training, "training")}
    _atomic_write(out / CHECKPOINT, lambda f: torch.save(payload, f), verify=_refuse_unsafe)
    text = json.dumps({"config": cfg, "history": rows, "epoch": payload["epoch"]}, indent=2, default=str)
    _atomic_write(out / "config.json", lambda f: f.write(text.encode()))
    return out / CHECKPOINT


def config_is_private(cfg: dict) -> bool:
    """Whether a stored config (any version) is a private run's."""
    return bool(cfg.get("privacy") or cfg.get("dp"))


def _safe_load(file: Path, map_location: str | torch.device) -> Any:
    """``torch.load(file, weights_only=True)``, every failure a CheckpointError naming ``file``.
    One open file handle for all the checks and the load: a checkpoint replaced meanwhile (a
    running ``lipnet train``) is either wholly the old file or wholly the new one."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"checkpoint {file} is empty (an interrupted copy?)")
        # torch.save writes zip archives; a truncated one loses its central directory (at the end)
        if not zipfile.is_zipfile(f):
            f.seek(0)
            named = _raw_pickle_globals(f)
            if named:
                raise CheckpointError(f"refusing to load {file}: a bare pickle (not a torch zip archive) naming "
                                      f"{', '.join(named)}, which only arbitrary unpickling could rebuild and which "
                                      "can run code (nothing of it was executed)")
            raise CheckpointError(f"{file} ({size} bytes) is not a PyTorch checkpoint archive: truncated, corrupt, "
                                  "or not written by `lipnet train`")
        try:
            f.seek(0)
            unsafe = _unsafe_globals(f)
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {file}: corrupt archive ({type(err).__name__})") from err
        if unsafe:
            raise CheckpointError(f"refusing to load {file}: it holds pickled objects ({', '.join(unsafe)}) that only "
                                  "arbitrary unpickling could rebuild, which can run code; lipnet checkpoints hold "
                                  "plain types and tensors only (nothing of it was executed)")
        try:
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                          type(err).__name__)
            raise CheckpointError(f"refusing to load {file}: its pickle is corrupt or needs arbitrary unpickling, "
                                  f"which can run code ({detail}); nothing of it was executed") from err
        except Exception as err:  # the zip reader's internal errors, EOF in a damaged record, ...
            raise CheckpointError(f"cannot read checkpoint {file}: corrupt or truncated "
                                  f"({type(err).__name__})") from err


def _privacy_from_dp(dp: dict | None) -> dict:
    """The fields of a version-2 config's ``dp`` dict as ``privacy`` and ``optimizer`` (which it
    named for private runs, while the config's own ``optimizer`` said "adam")."""
    if dp is None:
        return {"privacy": None}
    mechanism = {k: dp[k] for k in ("epsilon", "delta", "input_bound", "accountant", "noise", "momentum", "trainable",
                                    "freeze_bias", "loss_clip", "precompute") if k in dp}
    optimizer = dp.get("optimizer", "adam")
    if optimizer != "sgd":
        mechanism.pop("momentum", None)
    return {"privacy": mechanism, "optimizer": optimizer}


def _config_from_dict(cfg: dict, file: Path, version: int) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)} | ({"dp"} if version < 3 else set())
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{file}: unknown config fields {unknown} (written by a newer lipnet?)")
    cfg = dict(cfg)
    model_config = cfg.get("model_config") or {}
    if version < 2 and takes_parametrization(cfg.get("model")) and "parametrization" not in model_config:
        # written before layers stored their orthogonal factors: its raw parameters are "polar" ones,
        # and its convolutions had a bias before every centering (version-2 files without the key
        # hold cifar/imagenet-liresnet factors of the default "retraction" layers)
        cfg["model_config"] = {**model_config, "parametrization": "polar", "conv_bias": True}
    cfg["eval_eps"] = tuple(cfg.get("eval_eps", ()))  # version-1 files and JSON round trips may hold a list
    if version < 3 and "dp" in cfg:
        cfg.update(_privacy_from_dp(cfg.pop("dp")))
    try:
        return TrainConfig(**cfg)
    except TypeError as err:
        raise CheckpointError(f"{file}: incomplete config ({err})") from err
    except ValueError as err:
        raise CheckpointError(f"{file}: invalid config ({err})") from err


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The content of a checkpoint written by :func:`save_checkpoint` (``path``: its directory or
    the file), loaded with ``torch.load(weights_only=True)``: nothing in the file can run code.

    FileNotFoundError if there is no such file; CheckpointError (a ValueError) naming the file if
    it is empty, truncated or foreign, or holds objects that only arbitrary unpickling could
    rebuild (refused before unpickling them). Resuming needs ``map_location="cpu"`` (RNG states
    are CPU tensors; optimizer states follow their parameters' device when loaded)."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file} (expected the directory written by `lipnet train --out`)")
    raw = _safe_load(file, map_location)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), dict) and isinstance(raw.get("state_dict"), dict)):
        raise CheckpointError(f"{file} is not a lipnet checkpoint (expected a dict with 'config' and 'state_dict', "
                              "as `lipnet train --out` writes)")
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise CheckpointError(f"{file}: its history is a {type(history).__name__}, not a list")
    training = raw.get("training")
    needed = {"optimizer", "private"} if config_is_private(raw["config"]) else {"optimizer", "scheduler", "rng"}
    if training is not None and not (isinstance(training, dict) and needed <= set(training)):
        raise CheckpointError(f"{file}: incomplete training state (keys {sorted(training)})")
    epoch = raw.get("epoch", len(history))
    config = _config_from_dict(raw["config"], file, int(raw.get("version", 1)))
    return Checkpoint(file, config, raw["state_dict"], history, int(epoch), training)


def _config_sizes(value: Any, key: str) -> list[tuple[str, int]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, numbers.Integral):
        return [(key, int(value))]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _config_sizes(v, f"{key}[{i}]")]
    return []


def _check_sizes_fit(ckpt: Checkpoint) -> None:
    """Refuse, before anything is built, a model_config whose sizes no stored tensor could hold:
    building it first would allocate whatever a crafted file asks for (``hidden=10**9``). Every
    size of lipnet's models (widths, classes, image sizes, block counts) is at most a few times
    the largest dimension of its own weights."""
    tensors = [v for v in ckpt.state_dict.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise CheckpointError(f"{ckpt.path}: its state_dict holds no tensors")
    largest = max(max(t.shape, default=1) for t in tensors)
    limit = 8 * largest
    too_big = [(k, v) for key, value in ckpt.config.model_config.items() for k, v in _config_sizes(value, key)
               if v > limit]
    if too_big:
        listed = ", ".join(f"{k}={v}" for k, v in too_big)
        raise CheckpointError(f"{ckpt.path}: model_config {listed} cannot describe the stored weights (their largest "
                              f"dimension is {largest}); refusing to build it")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, list[dict]]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint` (a directory or the
    file): ``(model in eval mode on map_location, config, history)``. Loads safely and raises as
    :func:`read_checkpoint`; weights that do not fit the configured model are a CheckpointError."""
    ckpt = read_checkpoint(path, map_location)
    _check_sizes_fit(ckpt)
    model = build_model(ckpt.config.model, **ckpt.config.model_config)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit {ckpt.config.model}"
                              f"({ckpt.config.model_config}): {err}") from err
    return model.to(map_location).eval(), ckpt.config, ckpt.history


__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint",
           "read_checkpoint", "save_checkpoint"]
