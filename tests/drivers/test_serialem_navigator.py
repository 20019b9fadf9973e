"""Navigator files: the correlator fixture, round trips, edits, maps and registration."""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pytest

from drivers.imaging import apply_affine
from drivers.serialem import navigator as nv

_SHARED = Path(__file__).parents[3] / "shared" / "fixtures" / "serialem" / "correlator-clem.nav"
_COPY = Path(__file__).parent / "data" / "correlator-clem.nav"
FIXTURE = _SHARED if _SHARED.exists() else _COPY


@pytest.fixture
def raw() -> str:
    return FIXTURE.read_text(encoding="utf-8")


@pytest.fixture
def nav(raw: str) -> nv.NavigatorFile:
    return nv.loads(raw)


def test_copy_matches_shared_fixture() -> None:
    if not _SHARED.exists():
        pytest.skip("../shared is not beside the repository")
    assert _COPY.read_bytes() == _SHARED.read_bytes()


def test_reads_the_correlator_file(nav: nv.NavigatorFile) -> None:
    assert nav.header == (("AdocVersion", "2.00"),)
    assert [it.label for it in nav] == ["Leica", *map(str, range(1, 13))]
    leica = nav.item("Leica")
    assert leica.type is nv.ItemType.MAP
    assert leica.map_id == 370719668
    assert leica.regis == 2 and leica.group_id == 100000000
    assert leica.note == "mosaic--L0000--U00--V00_ch1.ome.tif"
    assert leica.map_width_height == (14823, 14800)
    assert np.array_equal(leica.map_scale_mat, [[7.751, 0.0], [0.0, 7.751]])
    assert leica.points.shape == (5, 2)
    assert np.allclose(leica.points[0], [-963.495, -962.0])
    p7 = nav.item("7")
    assert p7.type is nv.ItemType.POINT
    assert p7.stage_xyz == (-267.308, -423.333, 0.0)
    assert np.allclose(p7.points, [[-267.308, -423.333]])
    assert not p7.acquire and p7.reg_pt == 0 and p7.drawn_id is None
    assert nav.maps() == [leica]


def test_round_trip_is_byte_identical(raw: str, nav: nv.NavigatorFile, tmp_path: Path) -> None:
    assert nv.dumps(nav) == raw
    out = tmp_path / "copy.nav"
    nv.write(out, nav)
    assert out.read_bytes() == FIXTURE.read_bytes()


def test_unknown_keys_survive_an_edit(raw: str, nav: nv.NavigatorFile) -> None:
    leica = nav.item("Leica")
    assert {"Imported", "OrigReg", "RawStageXY", "MapMinMaxScale", "MapSlitIn"} <= \
        set(leica.keys())
    edited = nav.with_item(leica.with_value("Note", "atlas").with_value("Acquire", True))
    diff = [d for d in difflib.ndiff(raw.splitlines(), nv.dumps(edited).splitlines())
            if d[:1] in "+-"]
    assert diff == ["- Note = mosaic--L0000--U00--V00_ch1.ome.tif", "+ Note = atlas",
                    "+ Acquire = 1"]


def test_appended_key_goes_to_its_item(nav: nv.NavigatorFile) -> None:
    edited = nav.with_item(nav.item("3").with_value("Acquire", 1))
    text = nv.dumps(edited)
    block = text.split("[Item = 3]")[1].split("[Item = 4]")[0]
    assert block.strip().splitlines()[-1] == "Acquire = 1"
    assert edited.item("3").acquire


def test_values_formatted_like_serialem() -> None:
    item = nv.NavigatorItem(name="x").with_value("StageXYZ", (1.0, -2.5, 1234.5678))
    assert item.raw("StageXYZ") == "1 -2.5 1234.57"
    assert nv.format_float(-0.0) == "0"
    assert nv.format_float(1e-7) == "1e-07"
    with pytest.raises(nv.NavFileError):
        item.with_value("Note", "two\nlines")


def test_xml_form_round_trip(raw: str, nav: nv.NavigatorFile, tmp_path: Path) -> None:
    xml = nv.dumps(nav, "xml")
    assert xml.startswith('<?xml version="1.0" encoding="utf-8"?>\n<navigator>\n<PreData>\n'
                          "<AdocVersion>2.00</AdocVersion>\n</PreData>\n"
                          '<Item name="Leica">\n<Color>0</Color>\n')
    back = nv.loads(xml)
    assert back.form == "xml"
    assert back.header == nav.header and back.sections == nav.sections
    assert nv.dumps(back, "autodoc") == raw
    out = tmp_path / "x.nav"
    nv.write(out, back)
    assert nv.read(out).sections == nav.sections


def test_xml_escapes_and_trailing_sections() -> None:
    nav = nv.NavigatorFile(sections=(
        nv.NavigatorItem(name='a"<b>', entries=(("Note", "x & <y>"), ("Type", "0"))),
        nv.Section(kind="MontParam", name="1", entries=(("XYZ", "1 2"),)),
    ))
    back = nv.loads(nv.dumps(nav, "xml"))
    assert back.sections == nav.sections
    assert isinstance(back.sections[0], nv.NavigatorItem)
    assert not isinstance(back.sections[1], nv.NavigatorItem)
    assert nv.loads(nv.dumps(nav)).sections == nav.sections


def test_crlf_comments_and_foreign_bytes_survive(tmp_path: Path) -> None:
    data = (b"AdocVersion = 2.00\r\nLastSavedAs = C:\\d\\x.nav\r\n\r\n[Item = 1]\r\n"
            b"# kept comment\r\nNote = caf\xe9 \xb5m\r\nType = 0\r\n\r\n"
            b"[MontParam = 1]\r\nFoo = bar\r\n")
    path = tmp_path / "w.nav"
    path.write_bytes(data)
    nav = nv.read(path)
    assert nav.newline == "\r\n"
    assert nav.item("1").type is nv.ItemType.POINT
    nv.write(path, nav)
    assert path.read_bytes() == data


def test_map_pixel_stage_formula() -> None:
    # pixel = M (stage - map StageXY) + (W/2, H/2)
    item = nv.NavigatorItem(name="m", entries=(
        ("StageXYZ", "100 -50 0"), ("MapScaleMat", "2 1 -1 3"), ("MapWidthHeight", "400 300"),
        ("Type", "2")))
    assert np.allclose(item.stage_to_pixel([100, -50]), [200, 150])
    # stage (101, -48): d = (1, 2); M d = (2*1 + 1*2, -1*1 + 3*2) = (4, 5)
    assert np.allclose(item.stage_to_pixel([101, -48]), [204, 155])
    assert np.allclose(item.pixel_to_stage([204, 155]), [101, -48])
    pts = np.array([[0.0, 0.0], [400.0, 300.0], [17.5, 3.25]])
    assert np.allclose(item.stage_to_pixel(item.pixel_to_stage(pts)), pts)
    assert np.allclose(apply_affine(item.pixel_to_stage_affine(), pts),
                       item.pixel_to_stage(pts))


def test_fixture_map_centre(nav: nv.NavigatorFile) -> None:
    leica = nav.item("Leica")
    assert np.allclose(leica.stage_to_pixel([0.0, 0.0]), [14823 / 2, 14800 / 2])
    target = np.array(nav.item("8").stage_xyz[:2])
    px = leica.stage_to_pixel(target)
    assert np.allclose(px, [7411.5 + 7.751 * 292.402, 7400 + 7.751 * -7.188])
    assert np.allclose(leica.pixel_to_stage(px), target)


def test_singular_scale_matrix() -> None:
    item = nv.NavigatorItem(name="m", entries=(
        ("StageXYZ", "0 0 0"), ("MapScaleMat", "1 2 2 4"), ("MapWidthHeight", "4 4")))
    with pytest.raises(nv.NavFileError):
        item.pixel_to_stage([0, 0])


def test_add_point_with_unique_map_id(nav: nv.NavigatorFile) -> None:
    nav2, item = nav.add_point(12.5, -3.25, 1.0, note="virus 1", acquire=True, regis=2,
                               drawn_id=370719668)
    assert item.label == "13"
    assert item.map_id == 370719669
    assert item.map_id not in {it.map_id for it in nav.items if "MapID" in it}
    assert nv.dumps(nav2).endswith(
        "\n[Item = 13]\nColor = 0\nStageXYZ = 12.5 -3.25 1\nNumPts = 1\nRegis = 2\nType = 0\n"
        "Note = virus 1\nAcquire = 1\nDrawnID = 370719668\nMapID = 370719669\n"
        "PtsX = 12.5\nPtsY = -3.25\n")
    nav3, item2 = nav2.add_point(0, 0)
    assert item2.map_id == 370719670 and item2.label == "14"
    assert item2.to_nav_item().stage_um == (0.0, 0.0, 0.0)
    assert nv.loads(nv.dumps(nav3)).item("14").map_id == 370719670
    with pytest.raises(nv.NavFileError):
        nav3.add_point(1, 1, label="Leica")


def test_new_file_map_ids_start_at_100000() -> None:
    nav, item = nv.NavigatorFile().add_point(1, 2)
    assert item.map_id == nv.FIRST_NEW_MAP_ID
    assert nv.dumps(nav).startswith("AdocVersion = 2.00\n\n[Item = 1]\n")


def test_registration_pairs() -> None:
    nav = nv.NavigatorFile()
    for regis, reg_pt, x in [(1, 1, 0.0), (1, 2, 10.0), (2, 2, 110.0), (2, 1, 100.0),
                             (2, 3, 5.0), (1, 0, 7.0)]:
        nav, _ = nav.add_point(x, 0, regis=regis, reg_pt=reg_pt)
    pairs = nav.registration_pairs(1, 2)
    assert [(n, a.stage_xyz[0], b.stage_xyz[0]) for n, a, b in pairs] == \
        [(1, 0.0, 100.0), (2, 10.0, 110.0)]
    dup, _ = nav.add_point(1, 1, regis=1, reg_pt=1)
    with pytest.raises(nv.NavFileError):
        dup.registration_points(1)


@pytest.mark.parametrize("text", [
    "AdocVersion = 2.00\n[Item = 1]\nthis line has no equals\n",
    "<navigator><Item><Type>0</Type></Item></navigator>",
    "<navigator><Item name='1'>",
    "<other/>",
])
def test_malformed_files(text: str) -> None:
    with pytest.raises(nv.NavFileError):
        nv.loads(text)


def test_missing_and_bad_values() -> None:
    item = nv.NavigatorItem(name="1", entries=(("StageXYZ", "1 2"), ("Type", "x")))
    with pytest.raises(nv.NavFileError):
        _ = item.stage_xyz
    with pytest.raises(nv.NavFileError):
        _ = item.type
    with pytest.raises(nv.NavFileError):
        _ = item.map_id
    with pytest.raises(nv.NavFileError):
        nv.NavigatorFile().item("nope")
