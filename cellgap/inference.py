"""Inference over a folder that one bad file cannot sink.

- :class:`TolerantDataset`: MONAI's ``Dataset`` that turns a file it cannot load (damaged, not an image, too
  large for PIL) into a marked item instead of an exception in the loader;
- :class:`IsolatingEvaluator`: MONAI's ``SupervisedEvaluator`` that skips such items and any item whose network
  pass or post-processing (writing its outputs) fails, naming the file and the reason on the console, carries on
  with the others, writes ``summary_file`` (processed and failed files) and ends with :class:`BatchFailures`
  (a non-zero exit status) when any file failed;
- :class:`TilePaddingInferer`: MONAI's ``SlidingWindowInferer`` for images smaller than the window, whose reflect
  padding torch cannot do in one step when the padding exceeds the image (a 7×5 image in a 256² window): the
  image is reflected in steps (a 1-pixel side repeated) up to the window and the outputs cropped back, so every
  image gets a (possibly empty) result of its own size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer

from .atomic import write_json
from .failures import BatchFailures, describe  # noqa: F401  (BatchFailures: raised here, imported from here)

FAILURE = "failure"
SOURCE = "source"


class TolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items name their file (``source``) and that gives ``{"failure": reason,
    "source": file}`` for an item its transform cannot load, for :class:`IsolatingEvaluator` to report."""

    def _transform(self, index: int):
        item = self.data[index]
        source = str(item.get("image", index)) if isinstance(item, dict) else str(item)
        try:
            out = super()._transform(index)
        except Exception as error:  # any loader error belongs to this file alone
            return {FAILURE: describe(error), SOURCE: source}
        if isinstance(out, dict):
            out[SOURCE] = source
        return out


def _name(batchdata) -> str:
    source = batchdata.get(SOURCE) if isinstance(batchdata, dict) else None
    if isinstance(source, (list, tuple)):
        source = ", ".join(str(s) for s in source)
    return str(source) if source else "?"


class IsolatingEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that processes every file it can (see the module docstring). Give it a loader of
    batch size 1 so that a failure costs one file. ``summary_file``: JSON written at the end with ``processed``
    and ``failed`` ([{"file", "reason"}])."""

    def __init__(self, *args, summary_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.summary_file = summary_file
        self.failures: list[dict] = []
        self.processed: list[str] = []

    def _iteration(self, engine, batchdata):
        reason = None
        if isinstance(batchdata, dict) and FAILURE in batchdata:
            reason = batchdata[FAILURE]
            reason = "; ".join(reason) if isinstance(reason, (list, tuple)) else str(reason)
        else:
            try:
                output = super()._iteration(engine, batchdata)  # post-processing and writing run inside it
                self.processed.append(_name(batchdata))
                return output
            except Exception as error:  # one file's network pass or outputs: report it, go on with the others
                reason = describe(error)
        name = _name(batchdata)
        self.failures.append({"file": name, "reason": reason})
        print(f"FAILED {name}: {reason}", file=sys.stderr, flush=True)
        engine.state.output = {}
        return {}

    def run(self, global_epoch: int = 1) -> None:
        self.failures, self.processed = [], []
        super().run(global_epoch)
        if self.summary_file:
            write_json(Path(self.summary_file), {"processed": self.processed, "failed": self.failures})
        if self.failures:
            listing = "; ".join(f"{Path(f['file']).name} ({f['reason']})" for f in self.failures)
            raise BatchFailures(f"{len(self.failures)} of {len(self.failures) + len(self.processed)} file(s) could not be "
                                f"processed: {listing}. The others were written"
                                + (f"; summary: {self.summary_file}" if self.summary_file else ""),
                                failures=self.failures, output=self.summary_file)


def _reflect_up_to(x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` (B,C,H,W) padded by reflection (in steps; a side of 1 repeated) to at least ``size``, centred as
    MONAI's sliding window pads; returns the padded tensor and the (top, left) offset of the original."""
    top = left = 0
    while True:
        h, w = x.shape[-2:]
        need_h, need_w = max(size[0] - h, 0), max(size[1] - w, 0)
        if not need_h and not need_w:
            break
        if (need_h and h == 1) or (need_w and w == 1):  # nothing to reflect: repeat the one pixel once
            x = F.pad(x, (0, int(bool(need_w and w == 1)), 0, int(bool(need_h and h == 1))), mode="replicate")
            continue
        step_h, step_w = min(need_h, h - 1), min(need_w, w - 1)  # torch reflects at most side − 1 per step
        pad = (step_w // 2, step_w - step_w // 2, step_h // 2, step_h - step_h // 2)
        x = F.pad(x, pad, mode="reflect")
        top, left = top + pad[2], left + pad[0]
    return x, (top, left)


class TilePaddingInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that also takes images smaller than its window (see the module docstring)."""

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        roi = tuple(int(r) for r in self.roi_size)[-2:]
        h, w = inputs.shape[-2:]
        if h >= roi[0] and w >= roi[1]:
            return super().__call__(inputs, network, *args, **kwargs)
        padded, (top, left) = _reflect_up_to(inputs, roi)
        out = super().__call__(padded, network, *args, **kwargs)

        def crop(t):
            return t[..., top:top + h, left:left + w] if isinstance(t, torch.Tensor) and t.ndim >= 2 else t

        if isinstance(out, dict):
            return {k: crop(v) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return type(out)(crop(v) for v in out)
        return crop(out)
