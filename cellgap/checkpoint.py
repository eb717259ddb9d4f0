"""Decoder checkpoints: what they hold, how they are written, resumed and loaded.

A checkpoint is ``{"meta": {...}, "decoder": state_dict, ["encoder": state_dict]}`` (docs/contracts.md): the meta
says what the decoder was trained for and with (encoder and the identity of its weights, classes, decoder
architecture, magnification, score, epoch), so that the network is rebuilt from the checkpoint alone
(:func:`load_network`) and every loader refuses an encoder other than the one it was trained with. A randomly
initialised encoder (the demo) is stored under ``"encoder"``: a model always runs with its own encoder.

Training writes two files into ``ckpt_dir`` (:class:`TrainingCheckpoints`): ``model.pt``, the best model, replaced
only by a better one, across restarts too (its score travels in its meta); and ``last.pt``, the state to resume
from (decoder, optimizer, scheduler, AMP scaler, epoch and iteration, random states, best score), with the one
before kept as ``last.prev.pt``. Every write goes to a temporary file in the same folder, is fsynced and renamed
(:class:`AtomicDiskSaver`): a kill leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader as MonaiCheckpointLoader

from .decoder import DEFAULT_DECODER
from .locking import acquire, release

logger = logging.getLogger(__name__)

MODEL = "model.pt"
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
RANDOM = "random"
_hashes: dict[tuple, str] = {}  # (path, size, mtime) → sha256: a weights file is hashed once per process


# --------------------------------------------------------------------------------------------------
# what a checkpoint was trained for
# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def encoder_weights_id(encoder: str, weights) -> str:
    """Identity of an encoder's weights: ``"hub:<model id>"``, ``"sha256:<hex>"`` of a local weights file (of the
    weights file inside a hub-layout folder), or ``"random"``."""
    from .encoders import get_encoder_spec

    if weights is None or str(weights).lower() in ("none", RANDOM):
        return RANDOM
    if str(weights) == "hub":
        return f"hub:{get_encoder_spec(encoder).model_id}"
    path = Path(weights).expanduser()
    if path.is_dir():
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin") if (path / n).is_file()]
        if not files:
            raise FileNotFoundError(f"encoder weights {path}: no model.safetensors or pytorch_model.bin in it")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights {path}: no such file or folder")
    return f"sha256:{_sha256(path)}"


class CheckpointMeta:
    """What a decoder checkpoint was trained for; saved beside the weights and checked on load.

    Put it first in ``save_dict``/``load_dict`` (:func:`checkpoint_objects` does) so that a mismatch is reported
    before the decoder's tensor shapes are compared. ``encoder_weights``: the bundle's ``encoder_weights`` value
    ("hub", a local folder or file, None/"none" for a random encoder); ``decoder_config``: the decoder kwargs
    the network is built with. :class:`TrainingCheckpoints` adds ``best_score``, ``epoch`` and ``iteration``.
    """

    FIELDS = ("encoder", "class_names", "num_contour_classes", "num_distance_maps")

    def __init__(self, encoder: str, class_names, num_contour_classes: int = 3, num_distance_maps: int = 4,
                 extra: dict | None = None, decoder_config: dict | None = None, reduced_encoder: bool = False,
                 encoder_weights="hub"):
        self.info = {"encoder": str(encoder), "class_names": [str(c) for c in class_names],
                     "num_contour_classes": int(num_contour_classes), "num_distance_maps": int(num_distance_maps)}
        self.decoder_config = dict(decoder_config) if decoder_config is not None else None
        self.reduced_encoder = bool(reduced_encoder)
        self.weights_id = encoder_weights_id(encoder, encoder_weights)
        self.extra = dict(extra or {})
        self.progress: dict = {}  # best_score, epoch, iteration of the model being saved
        self.loaded: dict | None = None
        self.source: str = "checkpoint"  # the file being loaded, for messages

    @property
    def random_encoder(self) -> bool:
        return self.weights_id == RANDOM

    def state_dict(self) -> dict:
        state = {**self.extra, **self.info, "reduced_encoder": self.reduced_encoder, "encoder_weights_id": self.weights_id,
                 **self.progress}
        if self.decoder_config is not None:
            state["decoder_config"] = dict(self.decoder_config)
        return state

    def problems(self, state: Mapping) -> list[str]:
        """How a checkpoint's meta differs from this network (empty when it fits)."""
        found = [f"{k}: checkpoint has {state.get(k)!r}, this network has {self.info[k]!r}"
                 for k in self.FIELDS if state.get(k) != self.info[k]]
        if state.get("reduced_encoder", False) != self.reduced_encoder:
            found.append(f"reduced_encoder: checkpoint has {state.get('reduced_encoder', False)!r}, this network has "
                         f"{self.reduced_encoder!r}")
        theirs = state.get("encoder_weights_id")
        if theirs is not None and theirs != self.weights_id:
            found.append(f"encoder weights: checkpoint was trained with {describe_weights(theirs)}, this network has "
                         f"{describe_weights(self.weights_id)}; pass the weights it was trained with as encoder_weights")
        saved_decoder = state.get("decoder_config")
        if saved_decoder is not None and self.decoder_config is not None and dict(saved_decoder) != self.decoder_config:
            found.append(f"decoder: checkpoint was trained with {dict(saved_decoder)}, this network has {self.decoder_config}")
        return found

    def load_state_dict(self, state: dict) -> None:
        problems = self.problems(state)
        if problems:
            raise ValueError(f"{self.source} does not fit this network (" + "; ".join(problems) + "). Use a checkpoint "
                             "trained with this encoder and its weights on a dataset with these classes, drop architecture "
                             "overrides (the decoder is rebuilt from the checkpoint), or train one.")
        self.loaded = dict(state)


def describe_weights(weights_id: str) -> str:
    if weights_id == RANDOM:
        return "a randomly initialised encoder (stored in the checkpoint)"
    if weights_id.startswith("hub:"):
        return f"the hub weights {weights_id[4:]}"
    return f"local weights with {weights_id[:19]}…"


def checkpoint_objects(meta: CheckpointMeta, network) -> dict:
    """``save_dict`` / ``load_dict`` of a decoder checkpoint: meta first, the decoder, and a random encoder."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    objects = {"meta": meta, "decoder": network.decoder}
    if meta.random_encoder:
        objects["encoder"] = network.encoder
    return objects


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def existing_checkpoint(path: str | os.PathLike) -> str:
    """``path`` if it is a file, else a FileNotFoundError that says how to get one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path}: missing; train the bundle first (configs/train.json) or fetch "
                                f"published decoder weights with `python -m monai.bundle download_large_files --bundle_path .`")
    return str(path)


def _torch_load(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise ValueError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e}); it is damaged or not a "
                         f"checkpoint: train again or restore it from a copy") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a cellgap checkpoint (``meta`` + ``decoder``) and check that it is one."""
    existing_checkpoint(path)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "meta" not in ckpt or "decoder" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path}: not a cellgap decoder checkpoint (expected keys 'meta' and 'decoder', got {keys})")
    missing = [k for k in ("class_names", "encoder", "magnification", "min_cell_size") if k not in ckpt["meta"]]
    if missing:
        raise ValueError(f"checkpoint {path}: its meta lacks {missing}")
    if ckpt["meta"].get("encoder_weights_id") == RANDOM and "encoder" not in ckpt:
        raise ValueError(f"checkpoint {path}: trained with a random encoder but does not hold it; it cannot be applied")
    return ckpt


def decoder_config(checkpoint: Mapping) -> dict:
    """The decoder kwargs a checkpoint was trained with (older checkpoints without them: the bundles' default)."""
    return dict(checkpoint["meta"].get("decoder_config") or DEFAULT_DECODER)


def default_encoder_weights(checkpoint: Mapping) -> str:
    """The ``encoder_weights`` that rebuild a checkpoint's encoder when none is given: "none" for a random encoder
    (its weights are in the checkpoint), else "hub" (a local weights file must be passed by the user)."""
    return "none" if checkpoint["meta"].get("encoder_weights_id") == RANDOM else "hub"


def model_file(model: str | os.PathLike) -> Path:
    """The checkpoint file of ``model``: a file, or a bundle / run folder with ``models/model.pt``."""
    path = Path(model).expanduser()
    if path.is_dir():
        for candidate in (path / "models" / MODEL, path / MODEL):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path}: no models/{MODEL} in it; give a checkpoint file, a bundle folder or a run folder "
                                f"written by `cellgap train` / `cellgap demo`")
    existing_checkpoint(path)
    return path


def load_network(model: str | os.PathLike, encoder_weights=None, device="cpu"):
    """``(network, meta)``: :class:`cellgap.network.CellGapNet` rebuilt from a checkpoint's meta alone, its decoder
    (and stored random encoder) loaded, in eval mode on ``device``.

    ``model``: a checkpoint file, a bundle folder or a run folder (``models/model.pt``). ``encoder_weights``: None
    takes what the checkpoint names (its stored random encoder, or the hub); a local folder or file must be the
    one it was trained with (same sha256), else an error naming both."""
    import warnings

    from .network import CellGapNet

    path = model_file(model)
    ckpt = read_checkpoint(path)
    meta = ckpt["meta"]
    weights = default_encoder_weights(ckpt) if encoder_weights is None else encoder_weights
    random_encoder = encoder_weights_id(meta["encoder"], weights) == RANDOM
    with warnings.catch_warnings():
        if random_encoder:  # the stored weights replace the random initialisation below
            warnings.simplefilter("ignore")
        expected = CheckpointMeta(meta["encoder"], meta["class_names"], meta.get("num_contour_classes", 3),
                                  meta.get("num_distance_maps", 4), decoder_config=decoder_config(ckpt),
                                  reduced_encoder=meta.get("reduced_encoder", False), encoder_weights=weights)
        expected.source = f"checkpoint {path}"
        expected.load_state_dict(meta)  # the encoder identity, before any weights are built
        network = CellGapNet(meta["encoder"], num_classes=len(meta["class_names"]),
                             encoder_weights=None if random_encoder else weights, allow_random_encoder=random_encoder,
                             reduced_encoder=meta.get("reduced_encoder", False),
                             num_contour_classes=meta.get("num_contour_classes", 3),
                             num_distance_maps=meta.get("num_distance_maps", 4), decoder=decoder_config(ckpt))
    _load_module(network.decoder, ckpt["decoder"], path, "decoder")
    if "encoder" in ckpt:
        _load_module(network.encoder, ckpt["encoder"], path, "encoder")
    return network.to(device).eval(), dict(meta)


def _load_module(module: torch.nn.Module, state: Mapping, path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(shape_mismatch_message(path, what, e)) from None


def shape_mismatch_message(path, what: str, error: BaseException) -> str:
    first = str(error).strip().splitlines()
    detail = "; ".join(line.strip() for line in first[1:4]) or str(error)
    return (f"checkpoint {path}: its {what} does not fit the network built here ({detail}). The network must be built "
            f"as the checkpoint's meta says (decoder_config, reduced_encoder, classes): drop decoder / architecture "
            f"overrides, or use a checkpoint trained with these settings")


class CheckpointLoader(MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the file and the fix: a meta that does not fit (another
    encoder or encoder weights, classes, decoder) and decoder shapes that do not fit, instead of torch's bare
    ``Error(s) in loading state_dict``."""

    def __call__(self, engine: Engine) -> None:
        meta = self.load_dict.get("meta")
        if isinstance(meta, CheckpointMeta):
            meta.source = f"checkpoint {self.load_path}"
        try:
            super().__call__(engine)
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            raise ValueError(shape_mismatch_message(self.load_path, "decoder", e)) from None


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing to a temporary file in the same folder, fsynced and renamed over ``filename``
    (ignite's own ``atomic`` mode does not fsync, and MONAI's ``CheckpointSaver`` turns it off), so a kill or a
    full disk leaves the old checkpoint or the new one. ``filename``: a fixed name for every save (the rename
    replaces the old file, so ``remove`` of it does nothing); ``previous``: where the replaced file is kept."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, previous: str | None = None):
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename
        self.previous = previous

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func) -> None:
        save_atomically(checkpoint, path, previous=self.dirname / self.previous if self.previous else None, save=func)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


def save_atomically(obj, path: str | os.PathLike, previous: str | os.PathLike | None = None, save=torch.save) -> Path:
    """``save(obj, file)`` into a temporary file beside ``path``, fsynced, then renamed to ``path`` (the file it
    replaces moved to ``previous`` first when given); the folder entry is fsynced too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    return path


# --------------------------------------------------------------------------------------------------
# random states (resume)
# --------------------------------------------------------------------------------------------------
def _random_sources(root) -> list:
    """Objects reachable from ``root`` (a dataset, a Compose …) that hold their own random state: MONAI's
    ``Randomizable`` ``R`` or a ``torch.Generator``, found through every attribute as ``monai.data.utils.set_rnd``
    walks them (a dictionary transform's inner array transform has a RandomState of its own)."""
    found, stack, seen = [], [root], set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray, torch.Tensor)):
            continue
        seen.add(id(obj))
        if isinstance(getattr(obj, "R", None), np.random.RandomState) or isinstance(getattr(obj, "generator", None), torch.Generator):
            found.append(obj)
        if isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(reversed([v for k, v in vars(obj).items() if not k.startswith("__")]))
    return found


def _numpy_state(state: tuple) -> dict:
    return {"key": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]), "has_gauss": int(state[3]),
            "gauss": float(state[4])}


def _numpy_restore(state: Mapping) -> tuple:
    return ("MT19937", state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def random_states(sources=()) -> dict:
    """torch (CPU and CUDA), numpy, Python and each source's own random state."""
    py = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(np.random.get_state()),
             "python": [py[0], list(py[1]), py[2]], "sources": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for obj in sources:
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            state["sources"].append(_numpy_state(obj.R.get_state()))
        else:
            state["sources"].append(obj.generator.get_state())
    return state


def restore_random_states(state: Mapping, sources=()) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_restore(state["numpy"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("sources", [])
    if len(saved) != len(sources):
        logger.warning(f"resume: {len(saved)} saved random states of the data pipeline, {len(sources)} now; "
                       f"the data pipeline changed, its random draws will differ from an uninterrupted run")
        return
    for obj, s in zip(sources, saved):
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            obj.R.set_state(_numpy_restore(s))
        else:
            obj.generator.set_state(s)


# --------------------------------------------------------------------------------------------------
# the training run's checkpoints
# --------------------------------------------------------------------------------------------------
IDENTITY = ("encoder", "encoder_weights_id", "reduced_encoder", "class_names", "dataset", "decoder_config",
            "num_contour_classes", "num_distance_maps")


class TrainingCheckpoints:
    """Best and last checkpoints of a training run, and its resume: attach to the trainer after the
    ``ValidationHandler`` (its epoch's validation has run when this handler's epoch ends).

    - ``model.pt``: written when the validator's ``key_metric_name`` beats the best score so far, which starts from
      the score in an existing ``model.pt`` of the folder (so a rerun never replaces a better model); without a
      ``validator`` (no model selection) the latest model, every epoch;
    - ``last.pt`` at every epoch's end: everything to resume from; the one before kept as ``last.prev.pt``;
    - on start, with ``resume``: a ``last.pt`` of the folder is loaded (ignite ``Checkpoint.load_objects``), the
      trainer continues with the epoch after it; a damaged one falls back to ``last.prev.pt`` with a message;
      one of another encoder, weights, dataset, classes or decoder is refused with the reason;
    - ``save_dir`` (and ``lock``, e.g. the TensorBoard folder) is locked for the run (``cellgap.locking``).

    ``random_sources``: the training data pipeline (its random transforms' states are saved and restored);
    ``early_stop``: MONAI's ``EarlyStopHandler``, whose patience counter is resumed too; ``validation`` False
    ignores ``validator`` (a run without validation keeps its latest model).
    """

    def __init__(self, save_dir: str | os.PathLike, meta: CheckpointMeta, network, optimizer, validator=None,
                 key_metric_name: str | None = None, lr_scheduler=None, early_stop=None, random_sources=None,
                 resume: bool = True, lock=None, validation: bool = True):
        self.save_dir = Path(save_dir)
        self.meta = meta
        self.network = network
        self.optimizer = optimizer
        self.validator = validator if validation else None
        self.key_metric_name = key_metric_name
        self.lr_scheduler = lr_scheduler
        self.early_stop = early_stop
        self.sources = _random_sources(random_sources)
        self.resume_enabled = resume
        self.locks = [self.save_dir] + [Path(p) for p in ([lock] if isinstance(lock, (str, os.PathLike)) else (lock or []))]
        self.best_score: float | None = None
        self.best_epoch = 0
        self.trainer: Engine | None = None
        self._held: list[Path] = []
        self.resumed_from: Path | None = None

    # objects ---------------------------------------------------------------------------------------
    def _model_objects(self) -> dict:
        return checkpoint_objects(self.meta, self.network)

    def _resume_objects(self) -> dict:
        objects = {**self._model_objects(), "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None:
            objects["scaler"] = scaler
        sampler = getattr(getattr(self.trainer, "data_loader", None), "sampler", None)
        if hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict"):  # a seeded sampler's epoch count
            objects["sampler"] = sampler
        return objects

    # events ----------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:  # one lock for all ranks of the run
            for folder in self.locks:
                acquire(folder, "training")
                self._held.append(folder)
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def release(self, engine: Engine | None = None) -> None:
        while self._held:
            release(self._held.pop())

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        self.release()
        raise error  # ignite swallows an exception that a handler of this event does not raise again

    def started(self, engine: Engine) -> None:
        if self.validator is not None:
            self.best_score, self.best_epoch = self._best_on_disk()
        if self.resume_enabled:
            self.resume(engine)

    def _best_on_disk(self) -> tuple[float | None, int]:
        path = self.save_dir / MODEL
        if not path.is_file():
            return None, 0
        meta = read_checkpoint(path)["meta"]
        self._check_identity(meta, path, "holds a model of another run")
        score = meta.get("best_score")
        if score is None:
            raise ValueError(f"{path}: a model without a recorded score (written by an older cellgap), which this run "
                             f"could replace by a worse one; move it away or choose another ckpt_dir / --out")
        return float(score), int(meta.get("epoch", 0))

    def _check_identity(self, meta: Mapping, path: Path, what: str) -> None:
        ours = self.meta.state_dict()
        differ = [f"{k}: {meta.get(k)!r} there, {ours.get(k)!r} here" for k in IDENTITY
                  if k in ours and k in meta and meta.get(k) != ours.get(k)]
        if differ:
            raise ValueError(f"{path}: {what} (" + "; ".join(differ) + "); resume refused. Choose another ckpt_dir / --out "
                             "for this run, or delete that folder's checkpoints to start it again")

    def resume(self, engine: Engine) -> None:
        candidates = [p for p in (self.save_dir / LAST, self.save_dir / PREVIOUS) if p.is_file()]
        if not candidates:
            return
        state, failures = None, []
        for path in candidates:
            try:
                state = _torch_load(path)
                if not isinstance(state, dict) or "trainer" not in state or "meta" not in state:
                    raise ValueError(f"checkpoint {path}: not a resume state (keys {sorted(state) if isinstance(state, dict) else type(state).__name__})")
            except ValueError as e:
                failures.append(str(e))
                state = None
                continue
            if failures:
                message = f"{failures[-1]}; resuming from the previous one, {path}"
                logger.warning(message)
                print(message, file=sys.stderr, flush=True)
            break
        if state is None:
            raise ValueError("cannot resume: " + "; ".join(failures) + f". Delete {self.save_dir / LAST} and "
                             f"{self.save_dir / PREVIOUS} to train from the start")
        self._check_identity(state["meta"], path, "belongs to another run")
        self.meta.source = f"checkpoint {path}"
        to_load = self._resume_objects()
        optional = [k for k in ("lr_scheduler", "scaler") if k in to_load and k not in state]
        if optional:  # e.g. a CPU run (no AMP scaler) resumed on a GPU: those start afresh
            logger.warning(f"{path}: holds no {' or '.join(optional)} state; starting them afresh")
            to_load = {k: v for k, v in to_load.items() if k not in optional}
        try:
            Checkpoint.load_objects(to_load=to_load, checkpoint=state, strict=True)
        except RuntimeError as e:
            raise ValueError(shape_mismatch_message(path, "decoder or optimizer", e)) from None
        trainer = state["trainer"]
        engine.state.epoch = int(trainer["epoch"])
        engine.state.iteration = int(trainer["iteration"])
        best = state.get("best", {})
        if best.get("score") is not None and (self.best_score is None or best["score"] > self.best_score):
            self.best_score, self.best_epoch = float(best["score"]), int(best.get("epoch", 0))
        if self.validator is not None and self.best_score is not None:
            self.validator.state.best_metric = self.best_score
            self.validator.state.best_metric_epoch = self.best_epoch
        stopper = getattr(self.early_stop, "_handler", None)
        if stopper is not None and state.get("early_stop"):
            stopper.load_state_dict(state["early_stop"])
        restore_random_states(state["random"], self.sources)
        self.resumed_from = path
        text = (f"resuming from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}"
                + (f", best {self._metric_name()} {self.best_score:.4f} (epoch {self.best_epoch})" if self.best_score is not None else ""))
        logger.info(text)
        print(text, flush=True)

    def _metric_name(self) -> str | None:
        if self.key_metric_name:
            return self.key_metric_name
        return getattr(getattr(self.validator, "state", None), "key_metric_name", None)

    def _current_score(self, engine: Engine) -> float | None:
        if self.validator is None or getattr(self.validator.state, "epoch", None) != engine.state.epoch:
            return None  # no validation in this epoch
        value = self.validator.state.metrics.get(self._metric_name())
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def epoch_completed(self, engine: Engine) -> None:
        if self.validator is None:  # no model selection: model.pt is the latest model
            self.meta.progress = {"best_score": None, "epoch": engine.state.epoch, "iteration": engine.state.iteration}
            self._save(self._model_objects(), MODEL)
        score = self._current_score(engine)
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_epoch = score, engine.state.epoch
            self.meta.progress = {"best_score": score, "epoch": engine.state.epoch, "iteration": engine.state.iteration}
            self._save(self._model_objects(), MODEL)
            logger.info(f"epoch {engine.state.epoch}: new best {self._metric_name()} {score:.4f}, saved {self.save_dir / MODEL}")
        self.meta.progress = {"best_score": self.best_score, "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        extra = {"trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                             "epoch_length": engine.state.epoch_length},
                 "best": {"score": self.best_score, "epoch": self.best_epoch},
                 "random": random_states(self.sources)}
        stopper = getattr(self.early_stop, "_handler", None)
        if stopper is not None:
            extra["early_stop"] = stopper.state_dict()
        self._save(self._resume_objects(), LAST, previous=PREVIOUS, extra=extra)

    def _save(self, objects: dict, filename: str, previous: str | None = None, extra: dict | None = None) -> None:
        checkpoint = {k: getattr(v, "module", v).state_dict() for k, v in objects.items()}
        checkpoint.update(extra or {})
        AtomicDiskSaver(self.save_dir, filename, previous=previous)(checkpoint, filename)  # on rank 0 only
