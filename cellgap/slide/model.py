"""Loading the network a slide run uses from ``--model`` (a checkpoint file, a bundle folder or a run folder).

One function, :func:`load_model`, following the session's checkpoint contract as far as today's checkpoints
allow; ``cellgap.checkpoint.load_network`` (another branch) implements the contract in full and replaces it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

BUNDLE_DEFAULT_DECODER = {"widths": [64, 64, 64, 128, 256, 512], "head_features": 256, "head_width": 32, "norm": None}


def checkpoint_path(model: str | os.PathLike) -> Path:
    """``model`` itself if a file, else ``model/models/model.pt`` (bundle folder, or run folder of ``cellgap train`` /
    ``cellgap demo``)."""
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        inside = path / "models" / "model.pt"
        if inside.is_file():
            return inside
        raise FileNotFoundError(f"--model {path}: a folder without models/model.pt; give a checkpoint file, a bundle "
                                f"folder or a run folder of `cellgap train` / `cellgap demo` that finished training")
    raise FileNotFoundError(f"--model {path}: no such file or folder")


def _bundle_decoder(model: Path) -> dict | None:
    """The ``decoder`` entry of a bundle folder's configs (the decoder it was trained with by default)."""
    for name in ("train.json", "inference.json"):
        config = model / "configs" / name
        if model.is_dir() and config.is_file():
            decoder = json.loads(config.read_text()).get("decoder")
            if isinstance(decoder, dict):
                return decoder
    return None


def load_model(model: str | os.PathLike, encoder_weights: str | None = None, device: str | torch.device = "cpu"):
    """``(network, meta, checkpoint_file)``: :class:`cellgap.network.CellGapNet` rebuilt from the checkpoint's meta,
    decoder (and stored random encoder) loaded, in eval mode on ``device``.

    Decoder kwargs: ``meta["decoder_config"]``; today's checkpoints lack it, so the bundle folder's ``decoder``
    entry, then the bundle default, then the demo decoder, whichever matches the stored weights.  Encoder weights:
    the stored random encoder when ``meta["encoder_weights_id"] == "random"``, else ``encoder_weights`` ('hub' by
    default, or a local folder / file).
    """
    from ..cli import DEMO_DECODER
    from ..network import CellGapNet
    from ..training import read_checkpoint

    path = checkpoint_path(model)
    ckpt = read_checkpoint(path)
    meta = dict(ckpt["meta"])
    weights_id = meta.get("encoder_weights_id")
    random_encoder = weights_id == "random"
    if random_encoder and "encoder" not in ckpt:
        raise ValueError(f"checkpoint {path}: meta says the encoder is random but the checkpoint stores no 'encoder' weights")
    if encoder_weights is None and not random_encoder:
        encoder_weights = "hub"
    candidates = ([meta["decoder_config"]] if isinstance(meta.get("decoder_config"), dict) else
                  [c for c in (_bundle_decoder(Path(model)), BUNDLE_DEFAULT_DECODER, DEMO_DECODER) if c])
    class_names = list(meta["class_names"])
    errors = []
    for decoder in candidates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-encoder warning: the stored encoder is loaded next
            network = CellGapNet(meta["encoder"], num_classes=len(class_names),
                                 encoder_weights=None if random_encoder else encoder_weights,
                                 allow_random_encoder=random_encoder, reduced_encoder=bool(meta.get("reduced_encoder", False)),
                                 num_contour_classes=int(meta.get("num_contour_classes", 3)),
                                 num_distance_maps=int(meta.get("num_distance_maps", 4)), decoder=decoder)
        try:
            network.decoder.load_state_dict(ckpt["decoder"])
        except RuntimeError as e:
            errors.append(str(e).splitlines()[0] + " " + " ".join(str(e).split("size mismatch")[1:2])[:300])
            continue
        if random_encoder:
            network.encoder.load_state_dict(ckpt["encoder"])
        meta.setdefault("decoder_config", decoder)
        network.eval().to(device).prepare_layout(device)
        return network, meta, path
    raise ValueError(f"checkpoint {path}: its decoder weights do not fit a {meta['encoder']} network with "
                     f"{len(class_names)} classes {class_names} ({'; '.join(errors)}). The checkpoint's meta and weights "
                     f"disagree (another class set or decoder); use the checkpoint the run wrote, unchanged")
