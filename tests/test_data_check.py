"""`guie data check`: every problem kind is found, the cleaned manifest keeps exactly the usable images."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import data_fixtures as fx
from guie.cli import app
from guie.data.manifest import read_manifest
from guie.data.validate import CheckConfig, check_image, check_manifest, parallel_map, write_check_outputs

EXPECTED = {  # fixture name -> (errors, warnings)
    "good": ("", ""),
    "empty": ("empty", ""),
    "format": ("format", ""),
    "truncated": ("truncated", ""),
    "tiny": ("tiny", ""),
    "cmyk": ("", "cmyk"),
    "palette": ("", "palette"),
    "alpha": ("", "alpha"),
    "16bit": ("", "16bit;grayscale"),
    "exif": ("", "exif"),
    "missing": ("missing", ""),
}


@pytest.fixture()
def zoo(tmp_path):
    return fx.write_corrupt_images(tmp_path / "imgs")


def test_each_problem_kind_is_named(zoo):
    for name, path in zoo.items():
        r = check_image(str(path))
        assert (r.errors, r.warnings) == EXPECTED[name], name
        assert r.ok == (EXPECTED[name][0] == "")
    assert check_image(str(zoo["exif"])).orientation == 6
    assert check_image(str(zoo["good"])).width == 64


def test_thresholds_and_dropped_warnings(zoo):
    bomb = check_image(str(zoo["good"]), CheckConfig(max_pixels=1000))
    assert bomb.errors == "bomb" and "pixels" in bomb.message
    huge = check_image(str(zoo["good"]), CheckConfig(huge_pixels=100))
    assert huge.ok and huge.warnings == "huge"
    strict = check_image(str(zoo["cmyk"]), CheckConfig(drop=("cmyk",)))
    assert not strict.ok and strict.errors == "cmyk"
    headers_only = check_image(str(zoo["truncated"]), CheckConfig(decode=False))
    assert headers_only.ok                                      # truncation needs the full decode
    with pytest.raises(ValueError, match="unknown warning kind"):
        CheckConfig(drop=("blurry",))


@pytest.mark.parametrize("workers", [1, 2])
def test_check_manifest_parallel_same_result(zoo, workers):
    df = pd.DataFrame({"path": [str(p) for p in zoo.values()], "label": list(zoo)})
    res = check_manifest(df, workers=workers, progress=False, chunksize=2)
    assert res.report["path"].tolist() == df["path"].tolist()          # order kept across processes
    assert sorted(res.clean["label"]) == sorted(k for k, (e, _) in EXPECTED.items() if not e)
    assert res.counts["truncated"] == 1 and res.counts["cmyk"] == 1 and res.n_bad == 5


def test_outputs_and_nothing_deleted(zoo, tmp_path):
    df = pd.DataFrame({"path": [str(p) for p in zoo.values()], "label": list(zoo)})
    res = check_manifest(df, workers=1, progress=False)
    clean, report = write_check_outputs(res, tmp_path / "m")
    assert clean.name == "m.clean.csv" and report.name == "m.report.csv"
    assert len(read_manifest(clean)) == len(res.clean)
    rep = pd.read_csv(report, keep_default_na=False)
    assert set(rep["path"]) == {str(zoo[k]) for k, (e, w) in EXPECTED.items() if e or w}
    assert all(p.exists() for k, p in zoo.items() if k != "missing")


def test_parallel_map_keeps_order():
    assert parallel_map(abs, list(range(-50, 50)), workers=2, chunksize=7, progress=False) == \
        [abs(x) for x in range(-50, 50)]


def test_cli_check(zoo, tmp_path):
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(p) for p in zoo.values()], "label": list(zoo)}).to_csv(m, index=False)
    r = CliRunner().invoke(app, ["data", "check", str(m), "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "6 usable, 5 left out" in r.output and "truncated" in r.output
    assert (tmp_path / "m.clean.csv").is_file() and (tmp_path / "m.report.csv").is_file()
