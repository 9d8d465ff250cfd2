"""Issue 14, ingestion: no way to lose an image, no poison file. One test (or a few) per item of the issue.

Inputs come from ``tests/pipeline/hostile.py`` (made at test time, none stored).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

import pipeline.catalog.ingest as I
from pipeline.catalog import tables as C
from pipeline.catalog.ingest import IngestConfig, ingest, read_mes_export
from pipeline.cli import main
from pipeline.common import schemas as S
from pipeline.common.images import read_image
from tests.pipeline.catalog import hostile as H

DAY = H.DAY


def q_codes(root: Path) -> dict[str, str]:
    q = C.read_table(root, "quarantine")
    return {Path(p).name: c for p, c in zip(q[S.PATH], q[S.REASON_CODE], strict=True)}


def by_name(root: Path) -> pd.DataFrame:
    cat = C.read_catalog(root)
    return cat.set_index(cat[S.SOURCE_PATH].map(lambda p: Path(p).name))


# ------------------------------------------------------------------------------------------------ 1. settle time


def test_1_file_still_being_written_is_left_for_the_next_run_even_in_move_mode(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=2)
    full = H.image_bytes(H.gray(7, (64, 64)))
    cam = H.GrowingFile(drop / "L1" / DAY / "S09999.png", full, first=200)
    cam.start()
    writer = cam.write_slowly(3.0)  # the camera keeps writing while ingest looks at the file
    try:
        s1 = ingest(drop, root, progress=False, config=IngestConfig(quarantine_mode="move"))
    finally:
        writer.join()
    assert s1.registered == 2 and s1.n_quarantined == 0 and s1.left_unsettled == 1
    assert cam.path.read_bytes() == full  # nothing moved away under the writer
    H.backdate(cam.path)
    s2 = ingest(drop, root, progress=False, config=IngestConfig(quarantine_mode="move"))
    assert s2.registered == 1 and s2.n_quarantined == 0
    row = by_name(root).loc["S09999.png"]
    assert C.resolve_store_path(root, row[S.STORE_PATH]).read_bytes() == full
    assert all(g.exists() for g in goods)


def test_1_young_file_is_taken_after_the_settle_wait_when_it_did_not_change(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    fresh = H.write(drop / "L1" / DAY / "S00001.png", H.image_bytes(H.gray(1)))  # mtime = now
    t0 = time.perf_counter()
    s = ingest(drop, root, progress=False, config=IngestConfig(settle_s=0.5))
    assert s.registered == 1 and s.left_unsettled == 0
    assert time.perf_counter() - t0 >= 0.4  # the second look came after the settle time
    assert fresh.exists()


def test_1_changed_before_removal_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten between being read and being removed (delete_source) stays in the drop folder."""
    drop, root = tmp_path / "drop", tmp_path / "root"
    (good,) = H.good_drop(drop, n=1)
    real_publish = I._IngestRun.publish

    def publish_then_rewrite(self) -> None:  # noqa: ANN001
        if self.to_remove:
            good.write_bytes(H.image_bytes(H.gray(99)))  # the camera reused the name
        real_publish(self)

    monkeypatch.setattr(I._IngestRun, "publish", publish_then_rewrite)
    s = ingest(drop, root, progress=False, config=IngestConfig(delete_source=True))
    assert s.registered == 1 and s.kept_changed == 1
    assert good.exists()


# ------------------------------------------------------------------------------------------------ 2. overlap


@pytest.mark.parametrize(
    "layout", ["drop_is_root", "drop_is_store", "drop_in_catalog", "root_in_drop", "root_link_to_drop"]
)
def test_2_overlapping_drop_and_root_are_refused(tmp_path: Path, layout: str) -> None:
    base = tmp_path / "x"
    drop, root = {
        "drop_is_root": (base, base),
        "drop_is_store": (base / "store", base),
        "drop_in_catalog": (base / "catalog" / "incoming", base),
        "root_in_drop": (base, base / "L9" / "root"),
        "root_link_to_drop": (base, tmp_path / "link"),
    }[layout]
    if layout == "root_link_to_drop":
        base.mkdir(parents=True)
        (tmp_path / "link").symlink_to(base, target_is_directory=True)
    H.good_drop(drop, n=2)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="overlap"):
        ingest(drop, root, progress=False, config=IngestConfig(delete_source=True, quarantine_mode="move"))
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


def test_2_overlap_cli_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    H.good_drop(tmp_path / "x", n=1)
    C.content_store(tmp_path / "x").put(b"\x89PNG object", "png")
    assert main(["ingest", str(tmp_path / "x" / "store"), "--root", str(tmp_path / "x"), "--delete-source"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overlap" in err[0] and "Traceback" not in err[0]
    assert len(list((tmp_path / "x" / "store").rglob("*.png"))) == 1


def test_2_default_layout_drop_under_home_still_works(tmp_path: Path) -> None:
    home = tmp_path / "home"
    H.good_drop(home / "drop", n=2)
    s = ingest(home / "drop", home, progress=False, config=IngestConfig(delete_source=True))
    assert s.registered == 2 and len(C.read_catalog(home)) == 2


# ------------------------------------------------------------------------------------------------ 3. store repair


def test_3_corrupt_store_object_is_repaired_before_the_resent_copy_is_deleted(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    (good,) = H.good_drop(drop, n=1)
    ingest(drop, root, progress=False)
    obj = C.resolve_store_path(root, C.read_catalog(root)[S.STORE_PATH].iloc[0])
    H.flip_byte(obj)  # bit rot in the store
    resent = drop / "L1" / "2026-11-28" / "S00000.png"
    resent.parent.mkdir(parents=True)
    shutil.copy2(good, resent)
    s = ingest(drop, root, progress=False, config=IngestConfig(delete_source=True))
    assert s.duplicates == 1 and s.store_repaired == 1
    assert obj.read_bytes() == good.read_bytes()  # repaired from the good copy
    assert not resent.exists()  # removed only because the store holds the good bytes again


# ------------------------------------------------------------------------------------------------ 4. MES metadata


def test_4_mes_export_with_byte_order_mark_is_read(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    (g,) = H.good_drop(drop, n=1)
    H.mes_export(g.parent, [("S00000", "2026-11-27T08:00:00+00:00", "L1", "ST2", "mono")], bom=True)
    s = ingest(drop, root, progress=False)
    assert s.timestamp_sources == {"mes": 1}
    row = by_name(root).loc["S00000.png"]
    assert row[S.STATION] == "ST2" and row[S.PRODUCT_TYPE] == "mono"


def test_4_same_bytes_under_two_names_prefers_the_name_with_mes_data(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    folder = drop / "L1" / DAY
    data = H.image_bytes(H.gray(3))
    a = H.write(folder / "A00001.png", data)  # first in sort order, not in the MES export
    b = H.write(folder / "B00001.png", data)
    H.backdate(a, b)
    H.mes_export(folder, [("B00001", "2026-11-27T09:00:00+00:00", "L1", "ST1", "poly")])
    s = ingest(drop, root, progress=False)
    assert (s.registered, s.duplicates) == (1, 1)
    cat = C.read_catalog(root)
    assert Path(cat[S.SOURCE_PATH].iloc[0]).name == "B00001.png"
    assert cat[S.TIMESTAMP_SOURCE].iloc[0] == "mes" and cat[S.PRODUCT_TYPE].iloc[0] == "poly"
    assert Path(C.read_table(root, "duplicates")[S.SOURCE_PATH].iloc[0]).name == "A00001.png"


def test_4_duplicate_with_mes_data_in_a_later_run_upgrades_the_registered_image(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    (g,) = H.good_drop(drop, n=1)
    ingest(drop, root, progress=False)
    other = drop / "L1" / "2026-11-20"
    shutil.copy2(g, H.write(other / "X00001.png", b""))
    H.mes_export(other, [("X00001", "2026-11-20T07:00:00+00:00", "L1", "ST5", "mono")])
    s = ingest(drop, root, progress=False)
    assert s.duplicates == 1 and s.metadata_refreshed == 1
    cat = C.read_catalog(root)
    assert len(cat) == 1 and cat[S.TIMESTAMP_SOURCE].iloc[0] == "mes" and cat[S.STATION].iloc[0] == "ST5"
    assert cat[S.DATE].iloc[0] == "2026-11-20" and "mes_from_duplicate" in list(cat[S.FLAGS].iloc[0])


def test_4_remeta_rereads_a_fixed_export_and_moves_rows_to_their_day(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=3)
    H.write(goods[0].parent / "mes_export.csv", b"\xff\xfe garbage, not utf-8")  # unreadable export
    first = ingest(drop, root, progress=False)
    assert first.timestamp_sources == {"file_mtime": 3} and first.mes_problems
    old_dates = set(C.read_catalog(root)[S.DATE])
    H.mes_export(goods[0].parent, [(f"S{i:05d}", f"2026-10-0{i + 1}T12:00:00+00:00", "L1", f"ST{i}", "mono")
                                   for i in range(2)])
    assert main(["catalog", "remeta", str(drop), "--root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checked"] == 3 and out["updated"] == 3  # S00002 keeps its file time but loses the export flag
    cat = by_name(root)
    assert len(cat) == 3 and cat[S.IMAGE_ID].is_unique
    assert cat.loc["S00000.png", S.DATE] == "2026-10-01" and cat.loc["S00001.png", S.STATION] == "ST1"
    assert cat.loc["S00002.png", S.TIMESTAMP_SOURCE] == "file_mtime"
    assert list(cat.loc["S00002.png", S.FLAGS]) == [] and C.read_catalog(root)[S.FLAGS].map(len).sum() == 0
    assert len(C.read_catalog(root, start="2026-10-01", end="2026-10-03")) == 2
    assert C.catalog_stats(root).n_images == 3 and old_dates  # stats agree after the move
    again = I.refresh_metadata(drop, root)
    assert again.updated == 0  # idempotent


# ------------------------------------------------------------------------------------------------ 5. timestamps


@pytest.mark.parametrize("case", sorted(H.EXTREME_TIMESTAMPS))
def test_5_extreme_mes_timestamps_are_flagged_and_the_run_goes_on(tmp_path: Path, case: str) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=3)
    H.mes_export(goods[0].parent, [("S00000", H.EXTREME_TIMESTAMPS[case], "L1", "ST1", "mono"),
                                   ("S00001", "2026-11-27T10:00:00+01:00", "L1", "ST1", "mono")])
    s = ingest(drop, root, progress=False)
    assert s.registered == 3
    cat = by_name(root)
    row = cat.loc["S00000.png"]
    assert "implausible_mes_timestamp" in list(row[S.FLAGS])
    assert row[S.TIMESTAMP_SOURCE] == "file_mtime" and row[S.STATION] == "ST1"
    assert cat.loc["S00001.png", S.TIMESTAMP_SOURCE] == "mes"
    assert read_mes_export(goods[0].parent / "mes_export.csv")["S00000"].captured_at is None


# ------------------------------------------------------------------------------------------------ 6. file names


def test_6_non_utf8_file_name_is_quarantined_and_named(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    H.good_drop(drop, n=2)
    bad = H.non_utf8_name(drop / "L1" / DAY)
    H.backdate(bad)
    s = ingest(drop, root, progress=False)
    assert s.registered == 2 and s.quarantined == {"bad_filename": 1}
    q = C.read_table(root, "quarantine")
    assert "\\xff" in q[S.PATH].iloc[0] and "UTF-8" in q[S.REASON].iloc[0]
    assert Path(q[S.QUARANTINED_TO].iloc[0]).read_bytes() == bad.read_bytes()
    s2 = ingest(drop, root, progress=False)  # known now: not quarantined again
    assert s2.n_quarantined == 0 and s2.skipped_already_seen == 1


# ------------------------------------------------------------------------------------------------ 7. decode = readers


@pytest.mark.parametrize(
    ("name", "make", "code"),
    [("int32.tif", H.int32_tiff, "unsupported_mode"), ("short.png", H.short_idat_png, "truncated")],
)
def test_7_ingest_refuses_what_the_readers_refuse(tmp_path: Path, name: str, make, code: str) -> None:  # noqa: ANN001
    drop, root = tmp_path / "drop", tmp_path / "root"
    H.good_drop(drop, n=1)
    bad = H.write(drop / "L1" / DAY / name, make())
    H.backdate(bad)
    s = ingest(drop, root, progress=False)
    assert s.quarantined == {code: 1}
    with pytest.raises(ValueError):
        read_image(bad)


# ------------------------------------------------------------------------------------------------ 8. file_too_large


def test_8_file_too_large_is_recorded_without_copying(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    H.good_drop(drop, n=1)
    big = H.sparse_file(drop / "L1" / DAY / "huge.png", 300 * 2**20)
    H.backdate(big)
    s = ingest(drop, root, progress=False, config=IngestConfig(quarantine_mode="move"))
    assert s.quarantined == {"file_too_large": 1}
    q = C.read_table(root, "quarantine")
    assert pd.isna(q[S.QUARANTINED_TO].iloc[0]) and "not copied" in q[S.REASON].iloc[0]
    assert sum(f.stat().st_size for f in (root / "quarantine").rglob("*") if f.is_file()) == 0
    assert big.exists()  # nothing was copied, so nothing is removed either


# ------------------------------------------------------------------------------------------------ 10. MES fields


@pytest.mark.parametrize("case", sorted(H.HOSTILE_MES_FIELDS))
def test_10_hostile_mes_fields_are_refused_and_flagged(tmp_path: Path, case: str) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    (g,) = H.good_drop(drop, n=1)
    H.mes_export(g.parent, [("S00000", "2026-11-27T08:00:00Z", "L1", "ST1", H.HOSTILE_MES_FIELDS[case])])
    s = ingest(drop, root, progress=False)
    assert s.registered == 1
    row = by_name(root).loc["S00000.png"]
    assert pd.isna(row[S.PRODUCT_TYPE]) and "bad_mes_product_type" in list(row[S.FLAGS])
    assert row[S.TIMESTAMP_SOURCE] == "mes" and row[S.STATION] == "ST1"
    assert any("product_type" in p for p in s.mes_problems)


# ------------------------------------------------------------------------------------------------ 14. smaller ones


def test_14_png_with_bytes_after_iend_is_accepted_and_flagged(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    p = H.write(drop / "L1" / DAY / "S00001.png", H.png_with_trailer())
    H.backdate(p)
    s = ingest(drop, root, progress=False)
    assert s.registered == 1 and s.n_quarantined == 0
    assert "trailing_bytes" in list(C.read_catalog(root)[S.FLAGS].iloc[0])


def test_14_mes_problems_reach_json_run_record_and_row_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=2)
    H.mes_export(goods[0].parent, [("S00000", "yesterday", "L1", "ST1", "mono"),
                                   ("S00001", "2026-11-27T08:00:00Z", "L 1", "ST1", "mono")])
    assert main(["ingest", str(drop), "--root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mes_flags"] == {"bad_mes_line": 1, "bad_mes_timestamp": 1}
    assert any("S00000" in p and "timestamp" in p for p in out["mes_problems"])
    record = json.loads(next((root / "runs").glob("*.json")).read_text())
    assert record["mes_flags"] == out["mes_flags"] and record["mes_problems"] == out["mes_problems"]
    cat = by_name(root)
    assert "bad_mes_timestamp" in list(cat.loc["S00000.png", S.FLAGS])


def test_14_rerun_through_a_symlinked_drop_path_records_nothing_new(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=2)
    shutil.copy2(goods[0], goods[0].parent / "S09999.png")  # a duplicate
    H.backdate(H.write(goods[0].parent / "bad.png", b"not an image"))
    s1 = ingest(drop, root, progress=False)
    (tmp_path / "droplink").symlink_to(drop, target_is_directory=True)
    s2 = ingest(tmp_path / "droplink", root, progress=False)
    assert (s1.registered, s1.duplicates, s1.n_quarantined) == (2, 1, 1)
    assert (s2.registered, s2.duplicates, s2.n_quarantined) == (0, 0, 0)
    assert len(C.read_table(root, "duplicates")) == 1 and len(C.read_table(root, "quarantine")) == 1


def test_14_touch_does_not_record_duplicates_or_quarantine_copies_again(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=2)
    dup = goods[0].parent / "S09999.png"
    shutil.copy2(goods[0], dup)
    bad = H.write(goods[0].parent / "bad.png", b"not an image")
    H.backdate(bad)
    ingest(drop, root, progress=False)
    for p in (dup, bad, goods[1]):
        H.backdate(p, seconds=100)  # touched: new mtime, same bytes
    s = ingest(drop, root, progress=False)
    assert (s.registered, s.duplicates, s.n_quarantined) == (0, 0, 0)
    assert len(C.read_table(root, "duplicates")) == 1 and len(C.read_table(root, "quarantine")) == 1
    assert len([f for f in (root / "quarantine").rglob("*") if f.is_file()]) == 1


def test_14_files_a_crashed_run_did_not_remove_are_removed_by_the_next(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    goods = H.good_drop(drop, n=2)
    dup = goods[0].parent / "S09999.png"
    shutil.copy2(goods[0], dup)
    bad = H.write(goods[0].parent / "bad.png", b"not an image")
    H.backdate(bad)

    class Crash(Exception):
        pass

    def crash_after_publish(point: str) -> None:
        if point == "after_publish":
            raise Crash("killed after publishing, before removing")

    cfg = IngestConfig(delete_source=True, quarantine_mode="move")
    with pytest.raises(Crash):
        ingest(drop, root, progress=False, config=cfg, crash_hook=crash_after_publish)
    assert all(p.exists() for p in (*goods, dup, bad))
    s = ingest(drop, root, progress=False, config=cfg)
    assert s.removed == 4 and s.registered == 0
    assert not any(p.exists() for p in (*goods, dup, bad))
    for row in C.read_catalog(root).itertuples():
        assert C.content_store(root).verify(row.store_path.removeprefix("store/"))


def test_14_long_quarantined_name_keeps_its_extension(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    p = H.long_name(drop / "L1" / DAY, length=200, ext=".tif")
    H.backdate(p)
    ingest(drop, root, progress=False)
    dest = Path(C.read_table(root, "quarantine")[S.QUARANTINED_TO].iloc[0])
    assert dest.suffix == ".tif" and len(dest.name) <= 100 and dest.read_bytes() == p.read_bytes()


def test_14_clean_tmp_command_removes_leftovers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    H.good_drop(drop, n=1)
    ingest(drop, root, progress=False)
    obj = next((root / "store").rglob("*.png"))
    left = H.write(obj.parent / ".tmp-0123abcd", b"partial object")
    H.backdate(left)
    fresh = H.write(obj.parent / ".tmp-fresh", b"a writer's, in flight")
    assert main(["catalog", "clean-tmp", "--root", str(root)]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert not left.exists() and fresh.exists() and obj.exists()
    os.utime(fresh, ns=(0, 0))
    assert main(["catalog", "clean-tmp", "--root", str(root), "--min-age", "0"]) == 0
    assert not fresh.exists()


def test_14_intent_log_of_files_already_gone_is_dropped(tmp_path: Path) -> None:
    drop, root = tmp_path / "drop", tmp_path / "root"
    H.good_drop(drop, n=1)
    gone = I._Removal(str(drop / "L1" / DAY / "S77777.png"), 10, 0, sha="0" * 64, ext="png")
    H.write(root / "runs" / f"crashed{I.REMOVALS_SUFFIX}", (gone.to_json() + "\n").encode())
    ingest(drop, root, progress=False, config=IngestConfig(delete_source=True))
    assert not list((root / "runs").glob(f"*{I.REMOVALS_SUFFIX}"))
