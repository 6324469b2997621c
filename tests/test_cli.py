import json

from locconf.cli import build_parser, main


def test_synthetic_data_command_writes_coco(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64"]) == 0
    train = json.loads((tmp_path / "train.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert len(train["images"]) == 3 and len(val["images"]) == 2
    assert all((tmp_path / im["file_name"]).exists() for im in train["images"] + val["images"])


def test_parser_requires_a_command():
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args([])
