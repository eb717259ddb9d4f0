"""The vocabulary of batch jobs that one bad file cannot sink (inference over a folder, conversion of a user
folder): each failure is ``{"file": ..., "reason": describe(error)}``, printed as ``FAILED <file>: <reason>``,
and the job ends with :class:`BatchFailures` (a non-zero exit status) once the others are done."""

from __future__ import annotations

from PIL import Image


class BatchFailures(RuntimeError):
    """Some files of a batch job could not be processed (the others were). ``failures``: ``[{"file", "reason"}]``;
    ``output``: what the job wrote (complete without the failed files), when it has one."""

    def __init__(self, message: str, failures: list[dict] | None = None, output=None):
        super().__init__(message)
        self.failures = list(failures or [])
        self.output = output


def describe(error: BaseException) -> str:
    """One line: what went wrong, with the fix where one is known."""
    while error.__cause__ is not None and "applying transform" in str(error):  # MONAI's wrapper: its cause says what
        error = error.__cause__
    if isinstance(error, Image.DecompressionBombError):
        return (f"{error} This is an image of whole-slide size: segment it with `cellgap segment` (which reads it "
                f"tile by tile), or cut it into tiles; if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS")
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def listing(failures: list[dict], limit: int | None = None) -> str:
    """``a.png (reason); b.tif (reason)`` for a summary line; past ``limit`` failures, how many more."""
    shown = failures if limit is None else failures[:limit]
    more = len(failures) - len(shown)
    return "; ".join(f"{f['file']} ({f['reason']})" for f in shown) + (f"; … and {more} more" if more else "")
