"""Downloads against a loopback HTTP server: resume after interruption, corrupted archives, hashes."""

import hashlib
import io
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cellgap.data import download, pannuke
from cellgap.data.download import DownloadError, IntegrityError, Source
from cellgap.testing.fixtures import write_pannuke


class FileServer:
    """Serves ``files`` (name → bytes) on 127.0.0.1 with Range support.

    ``cut_after[name] = n``: the next full request for ``name`` sends the full Content-Length
    header but only ``n`` bytes, then drops the connection.  ``ignore_range``: answer 200 always.
    """

    def __init__(self, files):
        self.files = dict(files)
        self.cut_after = {}
        self.ignore_range = False
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404, "not found")
                    return
                data = server.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(name, None)
                if cut is not None and start == 0:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer({})
    yield s
    s.close()


def make_zip(members, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def payload(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    archive = make_zip({"data/a.bin": payload()})
    server.files["a.zip"] = archive
    server.cut_after["a.zip"] = 100_000
    dest = tmp_path / "a.zip"
    with pytest.raises(DownloadError, match="run again to resume"):
        download.download_file(f"{server.url}/a.zip", dest, retries=0, progress=False)
    part = tmp_path / "a.zip.part"
    assert part.stat().st_size == 100_000 and not dest.exists()

    download.download_file(f"{server.url}/a.zip", dest, retries=0, progress=False)
    assert server.requests[-1] == ("a.zip", "bytes=100000-")
    assert dest.read_bytes() == archive and not part.exists()
    recorded = json.loads((tmp_path / "checksums.json").read_text())
    assert recorded["a.zip"]["sha256"] == hashlib.sha256(archive).hexdigest()


def test_automatic_retry_completes_in_one_call(server, tmp_path):
    archive = make_zip({"b.bin": payload(seed=1)})
    server.files["b.zip"] = archive
    server.cut_after["b.zip"] = 5_000
    path = download.download_file(f"{server.url}/b.zip", tmp_path / "b.zip", retries=2, retry_wait=0, progress=False)
    assert path.read_bytes() == archive
    assert [r for _, r in server.requests] == [None, "bytes=5000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    archive = make_zip({"c.bin": payload(seed=2)})
    server.files["c.zip"] = archive
    server.ignore_range = True
    (tmp_path / "c.zip.part").write_bytes(archive[:1234])
    path = download.download_file(f"{server.url}/c.zip", tmp_path / "c.zip", progress=False)
    assert path.read_bytes() == archive


def test_corrupted_archive_is_an_error_and_nothing_is_placed(server, tmp_path):
    archive = bytearray(make_zip({"d.bin": payload(seed=3)}))
    archive[len(archive) // 2] ^= 0xFF  # flip a byte inside the member's data
    server.files["d.zip"] = bytes(archive)
    with pytest.raises(IntegrityError, match=r"d.zip.part: damaged zip archive: member 'd.bin' fails its CRC check"):
        download.download_file(f"{server.url}/d.zip", tmp_path / "d.zip", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_archive_is_an_error(server, tmp_path):
    server.files["e.zip"] = make_zip({"e.bin": payload(seed=4)})[:-200]
    with pytest.raises(IntegrityError, match="damaged or incomplete"):
        download.download_file(f"{server.url}/e.zip", tmp_path / "e.zip", progress=False)
    assert not (tmp_path / "e.zip").exists() and not (tmp_path / "e.zip.part").exists()


def test_hash_mismatch_is_an_error(server, tmp_path):
    server.files["f.zip"] = make_zip({"f.bin": b"hello"})
    with pytest.raises(IntegrityError, match="does not match " + "0" * 64):
        download.download_file(f"{server.url}/f.zip", tmp_path / "f.zip", sha256="0" * 64, progress=False)
    assert not (tmp_path / "f.zip").exists() and not (tmp_path / "f.zip.part").exists()


def test_recorded_hash_is_checked_on_later_use(server, tmp_path):
    server.files["g.csv"] = b"a,b\n1,2\n"
    dest = download.download_file(f"{server.url}/g.csv", tmp_path / "g.csv", progress=False)
    download.download_file(f"{server.url}/g.csv", dest, progress=False)  # verified again, fine
    dest.write_bytes(b"a,b\n1,3\n")
    with pytest.raises(IntegrityError, match="checksums.json"):
        download.download_file(f"{server.url}/g.csv", dest, progress=False)


def test_http_errors_name_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match="missing.zip: HTTP 404"):
        download.download_file(f"{server.url}/missing.zip", tmp_path / "missing.zip", retries=0, progress=False)


def fold_zips(tmp_path):
    """PanNuke-like fold zips built from the fixture, as the release packs them."""
    raw = write_pannuke(tmp_path / "fixture", tiles_per_fold=(4, 4, 4), size=32)
    zips = {}
    for k in (1, 2, 3):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for path in sorted((raw / f"Fold {k}").rglob("*.npy")):
                zf.write(path, path.relative_to(raw).as_posix())
        zips[f"fold_{k}.zip"] = buffer.getvalue()
    return zips


def test_pannuke_download_extract_and_convert_from_loopback(server, tmp_path, monkeypatch):
    zips = fold_zips(tmp_path)
    server.files.update(zips)
    # The release hashes do not fit the fixture: drop them, keep the file names.
    monkeypatch.setattr(pannuke, "SOURCES", tuple(Source(s.filename, s.url, None) for s in pannuke.SOURCES))
    raw = pannuke.download(tmp_path / "raw", urls=server.url + "/", progress=False)
    assert (raw / "Fold 2" / "masks" / "fold2" / "masks.npy").is_file()
    recorded = json.loads((raw / "downloads" / "checksums.json").read_text())
    assert set(recorded) == {"fold_1.zip", "fold_2.zip", "fold_3.zip"}
    n_requests = len(server.requests)
    pannuke.download(raw, urls=server.url, progress=False)  # second call: verified, nothing fetched
    assert len(server.requests) == n_requests
    out = pannuke.convert(raw, tmp_path / "prepared", progress=False)
    assert (out / "manifest.csv").is_file()


def test_local_archives_are_used_instead_of_downloading(tmp_path, monkeypatch):
    zips = fold_zips(tmp_path)
    local = tmp_path / "my_downloads"
    local.mkdir()
    for name, data in zips.items():
        (local / name).write_bytes(data)
    monkeypatch.setattr(pannuke, "SOURCES", tuple(Source(s.filename, None, None) for s in pannuke.SOURCES))
    raw = pannuke.download(tmp_path / "raw", archives=local, progress=False)
    assert (raw / "Fold 1" / "images" / "fold1" / "images.npy").is_file()
    assert not (raw / "downloads" / "fold_1.zip").exists()  # used in place, not copied
    (local / "fold_3.zip").write_bytes(zips["fold_3.zip"][:-300])
    with pytest.raises(IntegrityError, match="fold_3.zip"):
        pannuke.download(tmp_path / "raw_again", archives=local, progress=False)


def test_missing_url_explains_where_to_get_the_file(tmp_path):
    with pytest.raises(DownloadError, match="grand-challenge"):
        download.fetch_sources([Source("images.npy", None, note="see grand-challenge")], tmp_path, progress=False)


def test_resolve_urls_base_exact_and_mapping():
    sources = [Source("fold_1.zip", "https://x/fold_1.zip"), Source("fold_2.zip", "https://x/fold_2.zip")]
    assert download.resolve_urls(sources, "https://mirror/data/") == {"fold_1.zip": "https://mirror/data/fold_1.zip",
                                                                      "fold_2.zip": "https://mirror/data/fold_2.zip"}
    assert download.resolve_urls(sources, "https://m/fold_2.zip")["fold_2.zip"] == "https://m/fold_2.zip"
    assert download.resolve_urls(sources, "https://m/fold_2.zip")["fold_1.zip"] == "https://x/fold_1.zip"
    with pytest.raises(ValueError, match="unknown file name"):
        download.resolve_urls(sources, {"fold_9.zip": "https://m"})


def test_extract_refuses_unsafe_members(tmp_path):
    bad = tmp_path / "bad.tar"
    import tarfile

    with tarfile.open(bad, "w") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(IntegrityError, match="unsafe member"):
        download.extract_archive(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "escape.txt").exists()


def test_prepare_dataset_from_a_url(server, tmp_path, monkeypatch):
    from cellgap.data import cytodark0
    from cellgap.data.prepared import read_manifest
    from cellgap.data.registry import prepare_dataset
    from cellgap.testing.fixtures import write_cytodark0

    raw = write_cytodark0(tmp_path / "fixture", image_ids=(1, 62), size=64, smaller_tier=None, cells=(2, 4))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(raw.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(raw).as_posix())
    server.files["records/1/files/cytoDArk0.zip"] = buffer.getvalue()
    monkeypatch.setattr(cytodark0, "SOURCES", (Source("cytoDArk0.zip", None, None),))
    out = prepare_dataset("cytodark0", f"{server.url}/records/1/files/cytoDArk0.zip", tmp_path / "cd", tile_size=None,
                          progress=False)
    assert [r["split"] for r in read_manifest(out)] == ["train", "test"]
    assert (tmp_path / "cd_raw" / "downloads" / "cytoDArk0.zip").is_file()
