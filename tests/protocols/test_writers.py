"""Data files: OME-TIFF and MRC re-open in tifffile/mrcfile with the right metadata; mdoc and
angle files parse back; the mdoc text is pinned by a golden file; writes are atomic."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from drivers.imaging import Image, affine_from
from protocols.atomic_write import DataWriteError, atomic_path, write_text_atomic
from protocols.mdoc import MdocError, parse_autodoc, read_mdoc, read_tilt_angles
from protocols.mrc_io import MrcWriteError, read_mrc, write_mrc, write_tilt_series
from protocols.ome_tiff import OmeTiffError, read_ome_tiff, write_ome_tiff
from protocols.tilt_schemes import BidirectionalScheme, plan_tilts

GOLDEN = Path(__file__).parent / "data" / "tilt_series.mrc.mdoc"


def _lm(t: int, channel: str, z: int, shape: tuple[int, int] = (24, 32)) -> Image:
    value = 100 * t + 10 * ["DIC", "GFP"].index(channel) + z  # encodes where the plane belongs
    stage = (1500.0 + t, -250.5, 10.0)
    return Image(data=np.full(shape, value, np.uint16), pixel_size_um=0.325,
                 pixel_to_stage=affine_from(0.325, 1.5, stage[:2], shape), instrument="lm",
                 stage_um=stage, time_s=300.0 * t, channel=channel, objective="20x",
                 z_um=8.0 + 1.0 * z, exposure_s=0.05, index={"t": t, "z": z})


def _ome(path: Path) -> dict:
    with tifffile.TiffFile(path) as tif:
        return tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]


def test_single_image_ome_tiff_reopens_with_pixel_size_channel_and_affine(tmp_path: Path) -> None:
    image = _lm(0, "DIC", 0)
    path = write_ome_tiff(tmp_path / "atlas.ome.tif", image)
    data = tifffile.imread(path)
    np.testing.assert_array_equal(data, image.data)
    pixels = _ome(path)
    assert pixels["PhysicalSizeX"] == pytest.approx(0.325)
    assert pixels["PhysicalSizeY"] == pytest.approx(0.325)
    assert pixels["PhysicalSizeXUnit"] == "µm"
    assert pixels["Channel"]["Name"] == "DIC"
    assert pixels["Plane"]["PositionX"] == pytest.approx(1500.0)
    assert pixels["Plane"]["ExposureTime"] == pytest.approx(0.05)
    (back,) = read_ome_tiff(path)
    np.testing.assert_allclose(back.pixel_to_stage, image.pixel_to_stage)
    assert (back.channel, back.objective, back.z_um, back.stage_um) == \
        ("DIC", "20x", 8.0, image.stage_um)


def test_tcz_stack_is_laid_out_and_described_plane_by_plane(tmp_path: Path) -> None:
    planes = [_lm(t, c, z) for z in range(3) for c in ("GFP", "DIC") for t in range(2)]
    planes.sort(key=lambda im: (im.z_um, im.time_s))  # acquisition order must not matter
    path = write_ome_tiff(tmp_path / "timelapse.ome.tif", planes[::-1])
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == "TCZYX" and series.shape == (2, 2, 3, 24, 32)
        data = series.asarray()
    pixels = _ome(path)
    names = [c["Name"] for c in pixels["Channel"]]
    for t in range(2):
        for c, name in enumerate(names):
            for z in range(3):
                assert data[t, c, z, 0, 0] == 100 * t + 10 * ["DIC", "GFP"].index(name) + z
    assert pixels["PhysicalSizeZ"] == pytest.approx(1.0)
    plane = {(p["TheT"], p["TheC"], p["TheZ"]): p for p in pixels["Plane"]}
    assert plane[(1, 0, 2)]["PositionZ"] == pytest.approx(10.0)
    assert plane[(1, 0, 2)]["DeltaT"] == pytest.approx(300.0)
    assert plane[(1, 0, 2)]["PositionX"] == pytest.approx(1501.0)
    back = read_ome_tiff(path)
    assert len(back) == 12
    assert [(im.index["t"], im.channel, im.index["z"]) for im in back[:4]] == \
        [(0, names[0], 0), (0, names[0], 1), (0, names[0], 2), (0, names[1], 0)]


def test_incomplete_stack_is_refused_and_nothing_written(tmp_path: Path) -> None:
    planes = [_lm(t, "DIC", z) for t in range(2) for z in range(2)][:-1]
    with pytest.raises(OmeTiffError, match=r"missing \(t, channel, z\) \[\(1, 'DIC', 1\)\]"):
        write_ome_tiff(tmp_path / "x.ome.tif", planes)
    with pytest.raises(OmeTiffError, match="both claim"):
        write_ome_tiff(tmp_path / "x.ome.tif", [_lm(0, "DIC", 0), _lm(0, "DIC", 0)])
    assert list(tmp_path.iterdir()) == []


def test_foreign_ome_tiff_reads_with_axis_aligned_affine(tmp_path: Path) -> None:
    path = tmp_path / "other.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "Channel": {"Name": ["a", "b"]},
                               "Plane": {"PositionX": [10.0, 10.0], "PositionY": [20.0, 20.0]}})
    back = read_ome_tiff(path)
    assert [im.channel for im in back] == ["a", "b"]
    np.testing.assert_allclose(back[0].pixel_to_stage_xy([7.5, 7.5]), [10.0, 20.0])


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16], ids=str)
def test_mrc_keeps_dtype_and_pixel_size(tmp_path: Path, dtype: type) -> None:
    data = (np.arange(40 * 30).reshape(30, 40) % 1000).astype(dtype)
    path = write_mrc(tmp_path / "map.mrc", data, 0.0115)  # 115 A, a 4,700x map
    with mrcfile.open(path) as mrc:
        assert mrc.voxel_size.x == pytest.approx(115.0)
        assert mrc.voxel_size.y == pytest.approx(115.0)
        assert mrc.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(mrc.data, data)
    back = read_mrc(path)
    assert back.pixel_size_um == pytest.approx(0.0115) and not back.is_image_stack


def test_mrc_refuses_what_it_would_have_to_convert(tmp_path: Path) -> None:
    with pytest.raises(MrcWriteError, match="float64 has no MRC mode.*convert"):
        write_mrc(tmp_path / "x.mrc", np.zeros((4, 4)), 1.0)
    with pytest.raises(MrcWriteError, match="2D or 3D"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 4, 4), np.float32), 1.0)
    assert list(tmp_path.iterdir()) == []


def _tilt_series() -> list[Image]:
    plan = plan_tilts(BidirectionalScheme(-6, 6, 3), total_dose_e_per_a2=10.0)
    images = []
    for step in plan.steps:
        data = np.full((16, 20), 100 + step.index, np.int16)
        images.append(Image(
            data=data, pixel_size_um=2.8e-4, instrument="em",
            pixel_to_stage=affine_from(2.8e-4, 0.0, (120.5, -33.25), data.shape),
            stage_um=(120.5, -33.25, 4.75), time_s=40.0 * step.index, tilt_deg=step.tilt_deg,
            defocus_um=-6.0 + 0.1 * step.index, dose_e_per_a2=step.dose_e_per_a2,
            magnification=39000.0, mag_index=31, exposure_s=0.8, low_dose_area="R",
            extra={"image_shift_um": (0.05 * step.index, -0.02)}))
    return images


def test_tilt_series_files_reopen_with_angles_doses_and_pixel_size(tmp_path: Path) -> None:
    images = _tilt_series()
    files = write_tilt_series(tmp_path / "target-3.mrc", images, tilt_axis_deg=84.5,
                              start_time=datetime(2025, 3, 25, 17, 0, 46))
    with mrcfile.open(files.mrc) as mrc:
        assert mrc.data.shape == (5, 16, 20) and mrc.is_image_stack()
        assert mrc.voxel_size.x == pytest.approx(2.8)
        assert mrc.header.mode == 1
        np.testing.assert_array_equal(mrc.data[:, 0, 0], [100, 101, 102, 103, 104])
    assert files.mdoc.name == "target-3.mrc.mdoc" and files.rawtlt.name == "target-3.rawtlt"
    assert read_tilt_angles(files.rawtlt) == [0.0, 3.0, 6.0, -3.0, -6.0]
    doc, records = read_mdoc(files.mdoc)
    assert doc.globals["ImageFile"] == "target-3.mrc" and doc.globals["ImageSize"] == "20 16"
    assert any("Tilt axis angle = 84.5" in t for t in doc.titles)
    assert [r.tilt_deg for r in records] == [0.0, 3.0, 6.0, -3.0, -6.0]
    assert [r.dose_e_per_a2 for r in records] == pytest.approx([2.0] * 5)
    assert [r.prior_dose_e_per_a2 for r in records] == pytest.approx([0, 2, 4, 6, 8])
    assert records[4].defocus_um == pytest.approx(-5.6)
    assert records[4].image_shift_um == pytest.approx((0.2, -0.02))
    assert records[1].date_time == datetime(2025, 3, 25, 17, 1, 26)
    assert records[0].stage_um == (120.5, -33.25, 4.75)
    assert records[0].pixel_spacing_a == pytest.approx(2.8)


def test_mdoc_text_matches_golden_file(tmp_path: Path) -> None:
    files = write_tilt_series(tmp_path / "target-3.mrc", _tilt_series(), tilt_axis_deg=84.5,
                              start_time=datetime(2025, 3, 25, 17, 0, 46), target_defocus_um=-6.0)
    assert files.mdoc.read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")


def test_tilt_series_refuses_mixed_images(tmp_path: Path) -> None:
    images = _tilt_series()
    images[2] = images[2].with_data(np.zeros((8, 8), np.int16))
    with pytest.raises(MrcWriteError, match="tilt 2"):
        write_tilt_series(tmp_path / "ts.mrc", images)
    with pytest.raises(MrcWriteError, match=r"\.mrc"):
        write_tilt_series(tmp_path / "ts.st", _tilt_series())


def test_autodoc_parse_errors_name_the_line() -> None:
    doc = parse_autodoc("A = 1\n\n[ZValue = 0]\nTiltAngle = 3\n[T = title]\n")
    assert doc.globals == {"A": "1"} and doc.zvalues() == [{"TiltAngle": "3"}]
    with pytest.raises(MdocError, match="f.mdoc:2"):
        parse_autodoc("A = 1\nnonsense\n", "f.mdoc")


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "atlas.mrc"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.mrc"]
    with pytest.raises(DataWriteError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "x.txt", "data")
