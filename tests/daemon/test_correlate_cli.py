"""`clemd correlate points`: JSON out, exit codes 0/3/2, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.correlate_cmd import main
from protocols.correlation.transform_average import AveragedTransform

ROOT = Path(__file__).resolve().parents[2]


def _beads(seed: int = 0, n: int = 14) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """LM beads, EM beads (rotated 120 deg, mirrored, one lost and two extra per side)."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(0, 90, (n, 2))
    t = np.deg2rad(120.0)
    lin = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.diag([-1.0, 1.0])
    lm = np.concatenate([g[1:], rng.uniform(0, 90, (2, 2))]) + rng.normal(0, 0.03, (n + 1, 2))
    em = np.concatenate([g[:-1], rng.uniform(0, 90, (2, 2))]) @ lin.T + [800.0, -200.0]
    targets = np.array([[45.0, 45.0], [30.0, 60.0]])
    return lm, em, targets, targets @ lin.T + [800.0, -200.0]


def _write(path: Path, header: str, rows: np.ndarray | list[str]) -> Path:
    lines = [header] + [r if isinstance(r, str) else f"{float(r[0])!r},{float(r[1])!r}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    lm, em, targets, _ = _beads()
    return {
        "lm": _write(tmp_path / "lm.csv", "x,y", lm),
        "em": _write(tmp_path / "em.csv", "x,y", em),
        "targets": _write(tmp_path / "t.csv", "id,x,y",
                          [f"virus-{i},{x},{y}" for i, (x, y) in enumerate(targets)]),
        "out": tmp_path / "out.json",
    }


def _argv(f: dict[str, Path]) -> list[str]:
    return ["points", "--lm", str(f["lm"]), "--em", str(f["em"]), "--targets", str(f["targets"]),
            "--out", str(f["out"])]


def test_points_ok_writes_the_contract_json(files: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(files)) == 0
    assert capsys.readouterr().err == ""
    out = json.loads(files["out"].read_text())
    assert out["status"] == "ok"
    _, _, _, truth = _beads()
    got = np.array([[t["x"], t["y"]] for t in out["targets"]])
    assert [t["id"] for t in out["targets"]] == ["virus-0", "virus-1"]
    assert np.all(np.linalg.norm(got - truth, axis=1) < 0.2)
    assert all(0 < t["predicted_error_um"] < 0.5 for t in out["targets"])
    assert out["transform"]["mirrored"] is True
    assert out["transform"]["model"] == "averaged"
    assert {c["model"] for c in out["transform"]["components"]} <= {"similarity", "affine"}
    assert abs(sum(c["weight"] for c in out["transform"]["components"]) - 1.0) < 1e-9
    assert all(t["reliable"] for t in out["targets"])
    assert len(out["transform"]["matrix"]) == 2
    # The transform written is the one the targets went through.
    again = AveragedTransform.from_dict(out["transform"]).apply(_beads()[2])
    assert np.allclose(again, got, atol=1e-9)
    assert len(out["pairs"]) >= 10 and all("residual_um" in p for p in out["pairs"])
    assert len(out["leave_one_out_errors_um"]) == len(out["pairs"])
    assert out["elapsed_s"] > 0


def test_unmatchable_sets_exit_3(tmp_path: Path, files: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    _write(files["em"], "x,y", rng.uniform(0, 90, (15, 2)))
    assert main(_argv(files)) == 3
    out = json.loads(files["out"].read_text())
    assert out["status"] == "no_confident_match"
    assert out["targets"] == [] and out["transform"] is None and out["reason"]


@pytest.mark.parametrize(("content", "needle"), [
    ("", "empty file"),
    ("x,y\n", "0 bead(s)"),
    ("x,y\n1.0,2.0\n", "1 bead(s)"),
    ("x,y\n1.0,2.0\nnan,3.0\n4,5\n", "NaN"),
    ("x,y\n1.0,2.0\nabc,3.0\n4,5\n", "not a number"),
    ("a,b\n1.0,2.0\n3,4\n5,6\n", "lacks column"),
    ("x,y\n1.0\n3,4\n5,6\n", "not a number"),
    (b"\xff\xfe\x00bad", "cannot read"),
], ids=["empty", "header-only", "one-bead", "nan", "text", "no-header", "short-row", "binary"])
def test_bad_lm_file_exits_2_with_one_line(files: dict[str, Path], content: str | bytes,
                                           needle: str, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    if isinstance(content, bytes):
        files["lm"].write_bytes(content)
    else:
        files["lm"].write_text(content)
    assert main(_argv(files)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not files["out"].exists()


@pytest.mark.parametrize("argv_change", [
    lambda a: a[:2] + ["--lm", "/nonexistent/lm.csv"] + a[4:],
    lambda a: [x for x in a if x != "--out"][:-1],
    lambda a: a + ["--bogus"],
    lambda a: ["beads", "--lm", "a.tif", "--lm-pixel-um", "0.1", "--em", "b.mrc",
               "--em-pixel-um", "0.01", "--targets", "t.csv", "--out", "o.json"],
    lambda a: ["atlas"],
    lambda a: [],
], ids=["missing-file", "no-out", "unknown-flag", "beads-missing-files", "atlas-no-args",
        "no-subcommand"])
def test_bad_command_lines_exit_2_with_one_line(files: dict[str, Path], argv_change,  # type: ignore[no-untyped-def]
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv_change(_argv(files))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clemd correlate: ")


def test_bad_targets_and_unwritable_out(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _write(files["targets"], "x,y", np.zeros((1, 2)))  # no id column
    assert main(_argv(files)) == 2
    assert "id" in capsys.readouterr().err
    _write(files["targets"], "id,x,y", ["a,1,2"])
    files["out"] = tmp_path / "missing-dir" / "out.json"
    assert main(_argv(files)) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["lm-is-directory", "em-one-bead", "em-empty", "target-nan"])
def test_more_unusable_inputs_exit_2_with_one_line(files: dict[str, Path], tmp_path: Path,
                                                   change: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable LM path, a one-bead or empty EM list, a NaN target: exit 2, one line."""
    if change == "lm-is-directory":
        files["lm"] = tmp_path
    elif change == "em-one-bead":
        _write(files["em"], "x,y", np.array([[1.0, 2.0]]))
    elif change == "em-empty":
        files["em"].write_text("x,y\n")
    else:
        _write(files["targets"], "id,x,y", ["a,nan,2.0"])
    assert main(_argv(files)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clemd correlate: ") and "Traceback" not in err
    assert not files["out"].exists()


def test_subprocess_entry_point(files: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon.correlate_cmd", *_argv(files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(files["out"].read_text())["status"] == "ok"
    files["lm"].write_text("x,y\n1,2\n")
    proc = subprocess.run([sys.executable, "-m", "daemon.correlate_cmd", *_argv(files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- beads


@pytest.fixture
def bead_files(tmp_path: Path) -> dict[str, Path]:
    """LM TIFF (0.1 um/px) and EM MRC (0.04 um/px, rotated 70 deg, mirrored, 3 beads lost)
    of one bead layout, and LM pixel targets with their true EM pixels."""
    import mrcfile
    import tifffile

    from tests.protocols.bead_render import render_em, render_lm, spread_points

    grid = spread_points(21, 14, 3.0, 33.0, 3.0)
    t = np.deg2rad(70.0)
    lin = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.diag([-1.0, 1.0])
    em_um = (grid - 18.0) @ lin.T + 18.0
    tifffile.imwrite(tmp_path / "lm.tif", render_lm(grid / 0.1, seed=1).image)
    with mrcfile.new(tmp_path / "em.mrc") as mrc:
        mrc.set_data(render_em(em_um[3:] / 0.04, shape=(900, 900), radius_px=2.5,
                               seed=2).image)
    targets = np.array([[150.0, 120.0], [210.0, 200.0]])  # LM px
    truth = ((targets * 0.1 - 18.0) @ lin.T + 18.0) / 0.04
    np.save(tmp_path / "truth.npy", truth)
    _write(tmp_path / "t.csv", "id,x,y", [f"t{i},{x},{y}" for i, (x, y) in enumerate(targets)])
    return {"lm": tmp_path / "lm.tif", "em": tmp_path / "em.mrc", "targets": tmp_path / "t.csv",
            "out": tmp_path / "out.json", "truth": tmp_path / "truth.npy"}


def _beads_argv(f: dict[str, Path], lm_px: str = "0.1", em_px: str = "0.04") -> list[str]:
    return ["beads", "--lm", str(f["lm"]), "--lm-pixel-um", lm_px, "--em", str(f["em"]),
            "--em-pixel-um", em_px, "--targets", str(f["targets"]), "--out", str(f["out"])]


def test_beads_ok_targets_in_em_pixels(bead_files: dict[str, Path]) -> None:
    assert main(_beads_argv(bead_files)) == 0
    out = json.loads(bead_files["out"].read_text())
    assert out["status"] == "ok" and out["command"] == "beads" and out["units"] == "px"
    got = np.array([[t["x"], t["y"]] for t in out["targets"]])
    err_nm = np.linalg.norm(got - np.load(bead_files["truth"]), axis=1) * 40.0
    assert np.all(err_nm < 100.0), err_nm
    assert out["transform"]["mirrored"] is True
    assert out["detections"]["lm_count"] >= 14 and out["detections"]["em_count"] >= 11
    assert len(out["pairs"]) >= 9


@pytest.mark.parametrize(("change", "needle"), [
    ("lm-3d", "2D"),
    ("lm-garbage", "cannot read"),
    ("em-missing", "no such file"),
    ("lm-blank", "0 bead(s)"),
    ("pixel-nan", "pixel size"),
    ("pixel-negative", "pixel size"),
    ("pixel-missing", "--em-pixel-um"),
], ids=lambda v: v if " " not in v else None)
def test_beads_bad_input_exits_2_with_one_line(bead_files: dict[str, Path], change: str,
                                               needle: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    argv = _beads_argv(bead_files)
    if change == "lm-3d":
        tifffile.imwrite(bead_files["lm"], np.zeros((3, 64, 64), np.uint16),
                         photometric="minisblack")
    elif change == "lm-garbage":
        bead_files["lm"].write_bytes(b"II*\x00garbage, not a TIFF")
    elif change == "em-missing":
        bead_files["em"].unlink()
    elif change == "lm-blank":
        tifffile.imwrite(bead_files["lm"], np.full((128, 128), 100, np.uint16))
    elif change == "pixel-nan":
        argv = _beads_argv(bead_files, lm_px="nan")
    elif change == "pixel-negative":
        argv = _beads_argv(bead_files, em_px="-0.04")
    elif change == "pixel-missing":
        argv = [a for a in argv if a not in ("--em-pixel-um", "0.04")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert not bead_files["out"].exists()


# --------------------------------------------------------------------------- atlas


@pytest.fixture
def atlas_files(tmp_path: Path) -> dict[str, Path]:
    """LM-like and EM-like overviews of a synthetic grid (EM rotated -75 deg, mirrored)."""
    import tifffile

    from tests.protocols.grid_render import render_overview

    def lin(deg: float, s: float, mir: bool) -> np.ndarray:
        t = np.deg2rad(deg)
        m = s * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        return m @ np.diag([-1.0, 1.0]) if mir else m

    l1, l2 = lin(20, 1.0, False), lin(-75, 0.98, True)
    tifffile.imwrite(tmp_path / "lm.tif", render_overview(l1, np.array([1600.0, 1600.0]), 5.0,
                                                          640, "lm"))
    tifffile.imwrite(tmp_path / "em.tif", render_overview(l2, np.array([1600.0, 1650.0]), 5.5,
                                                          600, "em"))
    pts = np.array([[0.0, 0.0], [250.0, 125.0], [-500.0, 375.0]])
    lm_px = (pts @ l1.T + 1600.0) / 5.0
    np.save(tmp_path / "truth.npy", (pts @ l2.T + [1600.0, 1650.0]) / 5.5)
    _write(tmp_path / "p.csv", "id,x,y", [f"sq{i},{x},{y}" for i, (x, y) in enumerate(lm_px)])
    return {"lm": tmp_path / "lm.tif", "em": tmp_path / "em.tif", "points": tmp_path / "p.csv",
            "out": tmp_path / "out.json", "truth": tmp_path / "truth.npy"}


def _atlas_argv(f: dict[str, Path]) -> list[str]:
    return ["atlas", "--lm", str(f["lm"]), "--lm-pixel-um", "5.0", "--em", str(f["em"]),
            "--em-pixel-um", "5.5", "--points", str(f["points"]), "--out", str(f["out"])]


def test_atlas_answers_right(atlas_files: dict[str, Path]) -> None:
    """Exit 0 with points on the right squares and a margin reported in sigmas."""
    code = main(_atlas_argv(atlas_files))
    out = json.loads(atlas_files["out"].read_text())
    assert code == 0 and out["command"] == "atlas" and out["status"] == "ok", out["reason"]
    assert len(out["pairs"]) >= 100  # square openings paired under the chosen pose
    assert out["transform"]["mirrored"] is True
    assert out["transform"]["confidence_sigmas"] > 4.0
    got = np.array([[t["x"], t["y"]] for t in out["targets"]])
    err_um = np.linalg.norm(got - np.load(atlas_files["truth"]), axis=1) * 5.5
    assert np.all(err_um < 10.0), err_um


@pytest.mark.parametrize(("change", "needle"), [
    ("em-3d", "2D"), ("lm-missing", "no such file"), ("pixel-zero", "pixel size")],
    ids=["em-3d", "lm-missing", "pixel-zero"])
def test_atlas_bad_input_exits_2(atlas_files: dict[str, Path], change: str, needle: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    argv = _atlas_argv(atlas_files)
    if change == "em-3d":
        tifffile.imwrite(atlas_files["em"], np.zeros((2, 64, 64), np.float32),
                         photometric="minisblack")
    elif change == "lm-missing":
        atlas_files["lm"].unlink()
    else:
        argv[argv.index("--lm-pixel-um") + 1] = "0"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
