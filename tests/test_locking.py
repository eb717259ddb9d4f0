"""One writer per output: cellgap.locking."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cellgap.locking import LOCK_NAME, OutputLockedError, output_lock, read_lock

HOLD = """
import sys, time
from cellgap.locking import output_lock
with output_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_records_owner_and_is_released(tmp_path):
    with output_lock(tmp_path / "out", "training") as path:
        owner = read_lock(tmp_path / "out")
        assert owner["pid"] == os.getpid() and owner["what"] == "training" and path.name == LOCK_NAME
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_nested_hold_in_one_process_keeps_the_lock_until_the_outer_block_ends(tmp_path):
    with output_lock(tmp_path, "study run"):
        with output_lock(tmp_path, "training"):
            pass
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_process_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"test holder \(pid {holder.pid}"):
            with output_lock(tmp_path, "training"):
                pass
        assert read_lock(tmp_path)["pid"] == holder.pid  # the refused run left the other's lock alone
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "what": "old run"}))
    with output_lock(tmp_path, "training"):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-node", "what": "training"}))
    with pytest.raises(OutputLockedError, match="some-other-node.*delete"):
        with output_lock(tmp_path, "evaluation"):
            pass
