"""locconf.files: outputs never on inputs, one process per output (the lock)."""

import json
import os
import subprocess
import sys

import pytest

from locconf.files import check_outputs, lock_path, output_lock


def test_an_output_equal_to_an_input_is_refused_naming_both(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x")
    with pytest.raises(ValueError, match=r"--html .*cfg\.yaml is the config .*cfg\.yaml"):
        check_outputs({"--html": cfg}, {"config": cfg})
    # the same file through another spelling and through a symlink
    with pytest.raises(ValueError, match="is the config"):
        check_outputs({"--out": tmp_path / "sub" / ".." / "cfg.yaml"}, {"config": cfg})
    (tmp_path / "link.yaml").symlink_to(cfg)
    with pytest.raises(ValueError, match="is the config"):
        check_outputs({"--out": tmp_path / "link.yaml"}, {"config": cfg})
    # several inputs under one name, and a folder of inputs protects what is inside it
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(ValueError, match="is inside the images"):
        check_outputs({"--csv": images / "a.csv"}, {"images": [images]})
    with pytest.raises(ValueError, match="--json and --csv are the same file"):
        check_outputs({"--csv": tmp_path / "a", "--json": tmp_path / "a"}, {})
    check_outputs({"--out": tmp_path / "new.json", "--html": None}, {"config": cfg, "calibration": None})


def test_a_second_holder_is_refused_and_the_lock_removed_at_exit(tmp_path):
    out = tmp_path / "run"
    with output_lock(out, command="locconf train") as lock:
        assert lock == out / ".locconf.lock"
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["command"] == "locconf train"
        # another live process holds it: pretend the holder is our parent (alive, same host)
        info["pid"] = os.getppid()
        lock.write_text(json.dumps(info))
        with pytest.raises(ValueError, match=rf"run is in use by locconf train \(pid {os.getppid()}, since"):
            with output_lock(out, command="locconf eval"):
                pass
        info["pid"] = os.getpid()
        lock.write_text(json.dumps(info))
    assert not lock.exists()
    with pytest.raises(RuntimeError):
        with output_lock(out):
            raise RuntimeError("boom")
    assert not lock.exists(), "an error must release the lock"


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    lock_path(out).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "command": "locconf eval",
                                          "started": 0}))
    with caplog.at_level("WARNING", logger="locconf.files"):
        with output_lock(out):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert "no longer runs" in caplog.text
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(ValueError, match="on host elsewhere.*delete"):
        with output_lock(out):
            pass


def test_a_file_output_is_locked_beside_it(tmp_path):
    assert lock_path(tmp_path / "out.json") == tmp_path / ".out.json.locconf.lock"
    assert lock_path(tmp_path) == tmp_path / ".locconf.lock"
