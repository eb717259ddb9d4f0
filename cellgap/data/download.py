"""Resumable, verified downloads of the public datasets, or use of archives already on disk.

* **Resumable:** bytes go to ``<file>.part``; a later call (or an automatic retry) asks the server
  for the rest with an HTTP ``Range`` request and appends.
* **Verified:** a SHA-256 from the dataset's source table is checked when known; otherwise the
  hash is recorded in ``checksums.json`` next to the file on first download and checked on every
  later use.  Archives are tested (``zipfile.testzip``, reading every tar member) and ``.npy``
  files checked against their header before use.
* **Atomic:** the file appears under its final name only once complete and verified; archives
  are extracted into a temporary folder and moved into place.
* A local path can stand in for any URL ("use the archive I already downloaded").

Only the standard library's ``urllib`` is used for HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import IncompleteRead
from pathlib import Path

from tqdm.auto import tqdm

CHECKSUMS = "checksums.json"
DOWNLOADS = "downloads"
USER_AGENT = "cellgap-dataset-download"


class DownloadError(OSError):
    """The transfer failed (network error, HTTP error, interrupted); a ``.part`` file may remain to resume from."""


class IntegrityError(ValueError):
    """A downloaded or local file failed its checksum or archive test; nothing was placed."""


@dataclass(frozen=True)
class Source:
    """One file of a public dataset.

    ``url`` is ``None`` where no direct HTTP link is known (the user must pass a URL or a local
    file).  ``sha256`` is ``None`` where no published hash is known (recorded on first download).
    ``extract``: unpack the archive into the raw folder after verification.
    """

    filename: str
    url: str | None
    sha256: str | None = None
    extract: bool = True
    note: str = ""


# ------------------------------------------------------------------------------------- hashing


def sha256sum(path: str | os.PathLike, progress: bool = False) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
                                     desc=f"sha256 {path.name}", leave=False) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _read_checksums(folder: Path) -> dict:
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to record the checksums again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{file name: {{'sha256': ...}}}}")
    return data


def _record_checksum(folder: Path, filename: str, digest: str, origin: str) -> None:
    from ..atomic import atomic_write_text

    data = _read_checksums(folder)
    data[filename] = {"sha256": digest, "source": origin,
                      "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / CHECKSUMS, json.dumps(data, indent=2, sort_keys=True) + "\n")


def verify_file(path: str | os.PathLike, filename: str | None = None, sha256: str | None = None,
                checksum_dir: str | os.PathLike | None = None, origin: str = "", progress: bool = False) -> str:
    """Check a file's integrity and hash; return its SHA-256.

    The expected hash is ``sha256`` if given, else the one recorded in ``checksum_dir/checksums.json``
    under ``filename``; if neither exists, the hash is recorded there (when ``checksum_dir`` is given).
    Raises :class:`IntegrityError` on a mismatch or a damaged archive.
    """
    path = Path(path)
    filename = filename or path.name
    check_archive(path, filename)
    digest = sha256sum(path, progress=progress)
    expected, where = sha256, "the dataset's source table"
    if expected is None and checksum_dir is not None:
        recorded = _read_checksums(Path(checksum_dir)).get(filename)
        if recorded:
            expected, where = recorded.get("sha256"), str(Path(checksum_dir) / CHECKSUMS)
    if expected is not None and digest.lower() != expected.lower():
        raise IntegrityError(f"{path}: SHA-256 {digest} does not match {expected} from {where}; "
                             "the file is corrupt or not the expected release")
    if checksum_dir is not None:
        recorded = _read_checksums(Path(checksum_dir)).get(filename, {}).get("sha256")
        if recorded != digest:
            _record_checksum(Path(checksum_dir), filename, digest, origin or str(path))
    return digest


def check_archive(path: str | os.PathLike, filename: str | None = None) -> None:
    """Raise :class:`IntegrityError` if a ``.zip``/``.tar*``/``.npy`` file is damaged; other files pass."""
    path = Path(path)
    name = (filename or path.name).lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise IntegrityError(f"{path}: damaged zip archive: member {bad!r} fails its CRC check")
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(path) as tf:
                for member in tf:  # reading every member checks the compressed stream end to end
                    if member.isfile():
                        f = tf.extractfile(member)
                        while f is not None and f.read(1 << 20):
                            pass
        elif name.endswith(".npy"):
            from .native import open_npy

            open_npy(path, "a complete .npy array")
    except IntegrityError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as e:
        raise IntegrityError(f"{path}: damaged or incomplete file ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------ download


def _content_range_total(value: str | None) -> int | None:
    # "bytes 100-199/200" → 200
    if value and "/" in value:
        total = value.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    return None


def _transfer(url: str, part: Path, timeout: float, progress: bool, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part`` (Range request from its current size)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part file is already complete
            total = _content_range_total(e.headers.get("Content-Range"))
            if total is None or total == offset:
                return
            part.unlink()
            raise DownloadError(f"{url}: server refused to resume at byte {offset} of {total}; partial file removed, run again") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    with response:
        if offset and response.status == 200:
            offset = 0  # server ignored the Range header: start over
            mode = "wb"
        else:
            mode = "ab" if offset else "wb"
        length = response.headers.get("Content-Length")
        total = _content_range_total(response.headers.get("Content-Range")) if response.status == 206 else None
        if total is None and length is not None and length.isdigit():
            total = offset + int(length)
        received = offset
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           desc=part.name[: -len(".part")], disable=not progress) as bar:
            try:
                while True:
                    block = response.read(chunk_size)
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (IncompleteRead, ConnectionError, TimeoutError, OSError) as e:
                raise DownloadError(f"{url}: transfer interrupted after {received} of {total or '?'} bytes ({e}); "
                                    f"{part} is kept, run again to resume") from None
        if total is not None and received < total:
            raise DownloadError(f"{url}: transfer interrupted after {received} of {total} bytes; {part} is kept, run again to resume")


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
                  retries: int = 3, timeout: float = 60.0, chunk_size: int = 1 << 20, retry_wait: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` resumably, verify it and place it atomically; return ``dest``.

    If ``dest`` already exists it is verified instead (hash from ``sha256`` or ``checksums.json``).
    Interrupted transfers resume from ``dest.part`` up to ``retries`` times, then raise
    :class:`DownloadError` (keeping the part file for a later call).  A file that fails its hash or
    archive test raises :class:`IntegrityError`; its part file is deleted and nothing is placed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        verify_file(dest, sha256=sha256, checksum_dir=dest.parent, origin=url, progress=progress)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress, chunk_size)
            break
        except DownloadError:
            if attempt == retries:
                raise
            time.sleep(retry_wait)
    try:
        verify_file(part, filename=dest.name, sha256=sha256, checksum_dir=dest.parent, origin=url, progress=progress)
    except IntegrityError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------------- extract


def _safe_members(tf: tarfile.TarFile, archive: Path):
    for member in tf.getmembers():
        target = Path(member.name)
        if target.is_absolute() or ".." in target.parts or member.issym() or member.islnk():
            raise IntegrityError(f"{archive}: unsafe member {member.name!r} (absolute path, '..' or link); not extracting")
        yield member


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Unpack a verified zip/tar archive into ``dest_dir`` atomically; return ``dest_dir``.

    Members go to a temporary folder first; only when everything is unpacked are the top-level
    entries moved into ``dest_dir`` (replacing older copies, never ``downloads/``: an archive with such a top
    folder is refused).  A marker file records the
    extraction so that a second call does nothing.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = dest_dir / f".extracted-{archive.name}"
    if marker.exists():
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".extracting-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        name = archive.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for member in tqdm(members, desc=f"extract {archive.name}", disable=not progress):
                    target = Path(member.filename)
                    if target.is_absolute() or ".." in target.parts:
                        raise IntegrityError(f"{archive}: unsafe member {member.filename!r}; not extracting")
                    zf.extract(member, tmp)
        else:
            try:
                with tarfile.open(archive) as tf:
                    members = list(_safe_members(tf, archive))
                    if hasattr(tarfile, "data_filter"):  # Python ≥ 3.10.12 / 3.11.4
                        tf.extractall(tmp, members=members, filter="data")
                    else:
                        tf.extractall(tmp, members=members)
            except tarfile.TarError as e:
                raise IntegrityError(f"{archive}: damaged tar archive ({e})") from None
        reserved = [e.name for e in tmp.iterdir() if e.name == DOWNLOADS or e.name.startswith((".extracted-", ".extracting-"))]
        if reserved:  # never replace the verified archives and their checksums (or the extraction markers)
            raise ValueError(f"{archive}: its top-level {', '.join(repr(r) for r in reserved)} would replace "
                             f"{dest_dir / reserved[0]}, where cellgap keeps the downloaded archives and their "
                             f"checksums; nothing was extracted. Extract it by hand into another folder and pass that "
                             f"folder as --raw")
        for entry in tmp.iterdir():
            target = dest_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(entry, target)
        marker.write_text(datetime.now(timezone.utc).isoformat(timespec="seconds") + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


# ------------------------------------------------------------------------------ dataset sources


def resolve_urls(sources: Sequence[Source], urls: str | Mapping[str, str] | None) -> dict[str, str | None]:
    """URL per source file.  ``urls`` overrides: a mapping file name → URL, or one string that is
    either the full URL of a source (its path ends with the file name) or a base URL that every
    file name is appended to."""
    out = {s.filename: s.url for s in sources}
    if urls is None:
        return out
    if isinstance(urls, Mapping):
        unknown = set(urls) - set(out)
        if unknown:
            raise ValueError(f"urls: unknown file name(s) {sorted(unknown)}; expected some of {sorted(out)}")
        out.update(urls)
        return out
    text = str(urls)
    path = text.split("?", 1)[0].rstrip("/")
    exact = [s.filename for s in sources if path.endswith("/" + s.filename)]
    if exact:
        out[exact[0]] = text
    elif len(sources) == 1 and path.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz")):
        out[sources[0].filename] = text
    else:
        for s in sources:
            out[s.filename] = f"{path}/{s.filename}"
    return out


def _local_candidates(archives: str | os.PathLike | Iterable[str | os.PathLike] | None) -> dict[str, Path]:
    if archives is None:
        return {}
    items = [archives] if isinstance(archives, (str, os.PathLike)) else list(archives)
    found: dict[str, Path] = {}
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            for child in p.iterdir():
                if child.is_file():
                    found.setdefault(child.name, child)
        elif p.is_file():
            found[p.name] = p
        else:
            raise FileNotFoundError(f"{p}: no such archive or folder of archives")
    return found


def fetch_sources(sources: Sequence[Source], raw_dir: str | os.PathLike, urls: str | Mapping[str, str] | None = None,
                  archives: str | os.PathLike | Iterable[str | os.PathLike] | None = None, progress: bool = True,
                  retries: int = 3, timeout: float = 60.0) -> Path:
    """Make every source file of a dataset available and verified in ``raw_dir``; return ``raw_dir``.

    For each file: a copy already in ``raw_dir/downloads`` is verified; else a local file given in
    ``archives`` (a path, a folder, or a list of them) is verified and used in place; else it is
    downloaded.  Archives are then extracted into ``raw_dir`` and other files (``.npy``, ``.csv``)
    linked or copied there.  Hashes are checked against the source table, or recorded in
    ``raw_dir/downloads/checksums.json`` on first use and checked afterwards.
    """
    raw_dir = Path(raw_dir)
    downloads = raw_dir / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    resolved = resolve_urls(sources, urls)
    local = _local_candidates(archives)
    for source in sources:
        stored = downloads / source.filename
        if stored.exists():
            path = download_file(resolved[source.filename] or str(stored), stored, sha256=source.sha256, progress=progress)
        elif source.filename in local:
            path = local[source.filename]
            verify_file(path, filename=source.filename, sha256=source.sha256, checksum_dir=downloads,
                        origin=str(path), progress=progress)
        else:
            url = resolved[source.filename]
            if url is None:
                hint = f" {source.note}" if source.note else ""
                raise DownloadError(f"{source.filename}: no download URL is known.{hint} Pass its URL, or a local copy "
                                    "of the file (archives=... / --archives).")
            path = download_file(url, stored, sha256=source.sha256, progress=progress, retries=retries, timeout=timeout)
        if source.extract and source.filename.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz")):
            extract_archive(path, raw_dir, progress=progress)
        elif path.parent != raw_dir:
            target = raw_dir / source.filename
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
    return raw_dir
