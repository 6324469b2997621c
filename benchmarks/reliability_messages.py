"""What a user sees for each case of the reliability issue (25): every command through locconf's own entry point.

Run from the repository root: ``python benchmarks/reliability_messages.py``. It trains a 2-step
DIR model on 64 px synthetic scenes in a temporary folder (the helpers of
``tests/test_reliability.py``) and prints, per case, the command, its exit code and the last lines
it wrote on stderr. The tests assert these behaviours; this script shows them.
"""
import contextlib, io, json, os, sys, tempfile, struct, zlib
from pathlib import Path

sys.path.insert(0, "tests")
import torch, yaml
from test_reliability import make_data, tiny_config, candidates_file, working_folder
from locconf.cli import main

def run(argv):
    err = io.StringIO(); out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    lines = [l for l in err.getvalue().strip().splitlines() if l]
    return code, lines, out.getvalue()

def show(item, argv, note=""):
    code, lines, out = run(argv)
    shown = " ".join(a if len(a) < 60 else "..." + a[-40:] for a in argv)
    print(f"[{item}] locconf {shown}\n    exit {code}: " + ("\n    ".join(lines[-2:]) if lines else "(nothing on stderr)") + (f"\n    ({note})" if note else ""))
    return code, out

base = Path(tempfile.mkdtemp(prefix="issue25_"))
make_data(base / "data")
(base / "cfg.yaml").write_text(yaml.safe_dump(tiny_config()))
torch.manual_seed(0)
with working_folder(base):
    assert main(["train", "cfg.yaml", "--no-progress", "-q"]) == 0
    ck = "run/checkpoint_0000002.pth"
    # 1. a second process on a held folder: the lock file of a live process (pid 1 stands for it)
    (base / "run2").mkdir()
    (base / "run2" / ".locconf.lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "command": "locconf train", "since": "2026-12-07 22:00:00"}))
    (base / "cfg2.yaml").write_text(yaml.safe_dump(tiny_config(out_dir="run2")))
    show(1, ["train", "cfg2.yaml", "--no-progress"])
    # 2. an output on an input
    show(2, ["eval", "cfg.yaml", "--checkpoint", ck, "--html", "cfg.yaml", "--no-progress"])
    # 3. the calibration goes into --out; another split's is kept
    code, out = show(3, ["eval", "--checkpoint", ck, "--out", "ev", "--no-progress", "--calibration-min-boxes", "1"])
    print("    files in ev/:", sorted(p.name for p in (base / "ev").iterdir()), "; beside the checkpoint:", sorted(p.name for p in (base / "run").iterdir() if "calibration" in p.name))
    cal = base / "ev" / "calibration.json"
    if cal.exists():
        d = json.loads(cal.read_text()); d.setdefault("info", {})["fitted_on"] = {"checkpoint": "/elsewhere/other.pth", "annotations": "/elsewhere/val.json", "images": 9}
        cal.write_text(json.dumps(d))
        show(3, ["eval", "--checkpoint", ck, "--out", "ev", "--no-progress", "--calibration-min-boxes", "1"])
    # 5. duplicate keys
    (base / "dup.yaml").write_text("train:\n  iterations: 2\n  lr: 0.01\n  lr: 0.02\n")
    show(5, ["train", "dup.yaml"])
    (base / "dup2.yaml").write_text("train:\n  iterations: 2\n  out_dir: x\ntrain:\n  lr: 0.02\n")
    show(5, ["train", "dup2.yaml"])
    # 6. a negative area in the ground truth
    gt = json.loads((base / "data" / "val.json").read_text()); gt["annotations"][0]["area"] = -5.0
    (base / "neg.json").write_text(json.dumps(gt))
    cands = candidates_file(base / "c.json")
    show(6, ["postprocess", "c.json", "--out", "o.json", "--gt", "neg.json", "--no-progress"])
    # 7. predict from another folder: the checkpoint's class names and ids
    img = sorted((base / "data" / "val").glob("*.png"))[0] if (base / "data" / "val").is_dir() else sorted((base / "data").rglob("*.png"))[0]
    other = Path(tempfile.mkdtemp())
with working_folder(other):
    code, out = show(7, ["predict", str(img), "--checkpoint", str(base / ck), "--out", "vis.png", "--tile-size", "64", "--overlap", "0", "--no-progress", "--score-threshold", "0"])
    rows = (other / "vis.csv").read_text().splitlines()
    print("    vis.csv:", rows[0], "|", rows[1] if len(rows) > 1 else "(no rows)")
    dets = json.loads((other / "vis.json").read_text())
    print("    vis.json category ids:", sorted({d['category_id'] for d in dets}))
with working_folder(base):
    # 8. a calibration knot outside [0, 1]
    (base / "badcal.json").write_text(json.dumps({"x": [0.0, 1.0], "y": [0.0, 1.3]}))
    show(8, ["postprocess", "c.json", "--out", "o.json", "--calibration", "badcal.json", "--no-progress"])
    # 9. fields kept
    recs = json.loads(cands.read_text()); recs[0]["segmentation"] = [[1, 2, 3, 4]]; recs[0]["my_id"] = "a-17"
    (base / "c2.json").write_text(json.dumps(recs))
    show(9, ["postprocess", "c2.json", "--out", "kept.json", "--method", "none", "--no-progress"])
    print("    kept:", [ {k: r[k] for k in ("segmentation", "my_id")} for r in json.loads((base / "kept.json").read_text()) if "my_id" in r])
    # 10. a PNG that declares 20000 x 20000 pixels in 254 bytes; tile size 1
    def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    (base / "bomb.png").write_bytes(png)
    show(10, ["predict", "bomb.png", "--checkpoint", ck, "--out", "b.png", "--no-progress"])
    show(10, ["predict", "bomb.png", "--checkpoint", ck, "--out", "b.png", "--no-progress", "--max-pixels", "0"])
    show(10, ["predict", str(img), "--checkpoint", ck, "--out", "t.png", "--tile-size", "1", "--no-progress"])
    # 11. one-line errors, --debug
    show(11, ["eval", "--checkpoint", "missing.pth", "--no-progress"])
    code, lines, _ = run(["eval", "--checkpoint", "missing.pth", "--no-progress", "--debug"])
    print(f"[11] with --debug: exit {code}, {len(lines)} lines on stderr, first: {lines[0][:60]!r}")
    # 12. another head's config; a results file as --gt; a folder as a file
    t = tiny_config(); t["model"]["quality"] = "kl"; (base / "kl.yaml").write_text(yaml.safe_dump(t))
    show(12, ["eval", "kl.yaml", "--checkpoint", ck, "--out", "ev_kl", "--no-progress"])
    show(12, ["postprocess", "c.json", "--out", "o.json", "--gt", "c.json", "--no-progress"])
    (base / "afolder").mkdir()
    show(12, ["train", "afolder"])
