"""The Parquet catalog: schema, partitioned reads, snapshots, splits, compaction, stats, lock."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import tables as C
from pipeline.common import schemas as S

REPO = Path(__file__).resolve().parents[3]


def synthetic_rows(
    n_per: int = 5,
    lines=("L1", "L2"),
    days=("2026-11-25", "2026-11-26", "2026-11-27"),
    stations=("ST1", "ST2"),
    run_id: str = "run-a",
) -> pa.Table:
    rows = []
    k = 0
    for line in lines:
        for day in days:
            for i in range(n_per):
                sha = hashlib.sha256(f"{line}{day}{i}".encode()).hexdigest()
                ts = pd.Timestamp(f"{day}T00:00:00Z") + pd.Timedelta(hours=4 * i + 1)
                rows.append(
                    {
                        S.IMAGE_ID: sha[:24],
                        S.SHA256: sha,
                        S.SOURCE_PATH: f"/drop/{line}/{day}/S{k}.png",
                        S.SOURCE_SIZE: 100,
                        S.SOURCE_MTIME_NS: 0,
                        S.LINE: line,
                        S.STATION: stations[i % len(stations)],
                        S.CAPTURED_AT: ts.to_pydatetime(),
                        S.TIMESTAMP_SOURCE: "mes",
                        S.PRODUCT_TYPE: None,
                        S.WIDTH: 300,
                        S.HEIGHT: 300,
                        S.MODE: "L",
                        S.BIT_DEPTH: 8,
                        S.CONVERTED_FROM_RGB: False,
                        S.STORE_PATH: f"store/{sha[:2]}/{sha[2:4]}/{sha}.png",
                        S.INGESTED_AT: pd.Timestamp("2026-11-28T00:00:00Z").to_pydatetime(),
                        S.INGEST_RUN_ID: run_id,
                        S.DATE: day,
                        S.SPLIT: None,
                        S.FLAGS: [],
                    }
                )
                k += 1
    return pa.Table.from_pylist(rows, schema=S.CATALOG_SCHEMA)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    C.write_catalog_rows(r, synthetic_rows(), "part-run-a-00001")
    return r


def test_layout_and_schema_version_in_metadata(root: Path) -> None:
    parts = sorted((root / "catalog").rglob("part-*.parquet"))
    assert len(parts) == 6
    assert parts[0].relative_to(root).parts[:3] == ("catalog", "line=L1", "date=2026-11-25")
    schema = pq.read_schema(parts[0])
    assert S.schema_version_of(schema) == S.SCHEMA_VERSION
    assert S.LINE not in schema.names and S.DATE not in schema.names  # encoded in the path
    # standard readers see the hive partitions
    df = pd.read_parquet(root / "catalog")
    assert len(df) == 30 and set(df[S.LINE].astype(str)) == {"L1", "L2"}


def test_read_all_and_types(root: Path) -> None:
    df = C.read_catalog(root)
    assert list(df.columns) == S.CATALOG_SCHEMA.names
    assert len(df) == 30 and df[S.IMAGE_ID].is_unique
    assert str(df[S.CAPTURED_AT].dt.tz) == "UTC"
    assert df[S.CAPTURED_AT].is_monotonic_increasing


def test_window_line_station_filters(root: Path) -> None:
    df = C.read_catalog(root, lines="L1", start="2026-11-26", end="2026-11-27")
    assert len(df) == 5 and set(df[S.DATE]) == {"2026-11-26"} and set(df[S.LINE]) == {"L1"}
    # start inclusive, end exclusive, tz-aware bounds converted to UTC
    df = C.read_catalog(root, lines=["L2"], start="2026-11-26T01:00:00Z", end="2026-11-26T06:00:00+01:00")
    assert list(df[S.CAPTURED_AT]) == [pd.Timestamp("2026-11-26T01:00:00Z")]
    df = C.read_catalog(root, stations="ST2", columns=[S.IMAGE_ID, S.STATION])
    assert list(df.columns) == [S.IMAGE_ID, S.STATION] and set(df[S.STATION]) == {"ST2"} and len(df) == 12
    assert C.read_catalog(root, lines="L9").empty


def test_bad_queries_raise(root: Path) -> None:
    with pytest.raises(ValueError, match="unknown catalog columns"):
        C.read_catalog(root, columns=["nope"])
    with pytest.raises(ValueError, match="empty time window"):
        C.read_catalog(root, start="2026-11-27", end="2026-11-26")


def test_empty_catalog_reads_empty_frame(tmp_path: Path) -> None:
    df = C.read_catalog(tmp_path / "nothing", columns=[S.IMAGE_ID, S.LINE])
    assert df.empty and list(df.columns) == [S.IMAGE_ID, S.LINE]


def test_partition_pruning_never_opens_other_partitions(root: Path) -> None:
    """A garbage part file in one partition does not disturb queries that prune it away."""
    bad = root / "catalog" / "line=L2" / "date=2026-11-27" / "part-garbage.parquet"
    bad.write_bytes(b"not parquet at all")
    assert len(C.read_catalog(root, lines="L1", start="2026-11-27", end="2026-11-28")) == 5
    assert len(C.read_catalog(root, lines="L2", start="2026-11-25", end="2026-11-27")) == 10
    with pytest.raises(pa.ArrowInvalid):
        C.read_catalog(root, lines="L2")


def test_temporary_files_are_ignored_and_cleaned(root: Path) -> None:
    folder = root / "catalog" / "line=L1" / "date=2026-11-25"
    (folder / ".tmp-abc-part-x.parquet").write_bytes(b"half written")
    assert len(C.read_catalog(root)) == 30
    assert C.clean_temporary(root) == 0  # younger than min_age_s: maybe a writer in flight
    assert C.clean_temporary(root, min_age_s=0) == 1
    assert not list(folder.glob(".tmp-*"))


def test_snapshot_digest_is_order_independent_and_reloads_exactly(root: Path) -> None:
    df = C.read_catalog(root, lines="L1")
    snap = C.snapshot(df, "train-test", root)
    expected = hashlib.sha256(
        "".join(f"{i}\t{s}\n" for i, s in sorted(zip(df[S.IMAGE_ID], df[S.SHA256], strict=True))).encode()
    ).hexdigest()
    assert snap.digest == expected and snap.n_images == 15
    again = C.snapshot(df.sample(frac=1, random_state=1), "other-name", root)
    assert again.digest == snap.digest
    assert C.list_snapshots(root).iloc[0]["names"] == ["train-test", "other-name"]
    loaded = C.load_snapshot(root, snap.digest[:10])
    assert set(loaded[S.IMAGE_ID]) == set(df[S.IMAGE_ID]) and len(loaded) == 15
    # more data arriving later does not change what the snapshot names
    C.write_catalog_rows(root, synthetic_rows(days=("2026-11-28",), run_id="run-b"), "part-run-b-00001")
    assert set(C.load_snapshot(root, snap.digest)[S.IMAGE_ID]) == set(df[S.IMAGE_ID])
    assert C.snapshot(C.read_catalog(root, lines="L1"), "x", root).digest != snap.digest


def test_snapshot_from_query_and_errors(root: Path) -> None:
    snap = C.snapshot({"lines": "L2", "start": "2026-11-27", "end": "2026-11-28"}, "monitor-L2", root)
    assert snap.n_images == 5
    assert C.load_snapshot(root, snap.digest)[S.LINE].eq("L2").all()
    with pytest.raises(ValueError, match="zero images"):
        C.snapshot({"lines": "L9"}, "empty", root)
    with pytest.raises(ValueError, match="no snapshot"):
        C.load_snapshot(root, "deadbeefdeadbeef")
    with pytest.raises(ValueError, match="needs columns"):
        C.snapshot(pd.DataFrame({"x": [1]}), "bad", root)


def test_load_snapshot_detects_lost_images(root: Path) -> None:
    snap = C.snapshot({"lines": "L1", "start": "2026-11-25", "end": "2026-11-26"}, "s", root)
    for p in (root / "catalog" / "line=L1" / "date=2026-11-25").glob("part-*"):
        p.unlink()
    with pytest.raises(ValueError, match="no longer in the catalog"):
        C.load_snapshot(root, snap.digest)


def test_split_overlay_latest_wins(root: Path) -> None:
    ids = list(C.read_catalog(root, lines="L1")[S.IMAGE_ID])
    assert C.set_split(root, ids[:10], "train") == 10
    C.set_split(root, ids[8:12], "calibration")
    df = C.read_catalog(root)
    assert (df[S.SPLIT] == "train").sum() == 8 and (df[S.SPLIT] == "calibration").sum() == 4
    assert set(C.read_catalog(root, split="calibration")[S.IMAGE_ID]) == set(ids[8:12])
    C.set_split(root, ids[8:9], None)
    assert len(C.read_catalog(root, split="calibration")) == 3
    with pytest.raises(ValueError, match="not in the catalog"):
        C.set_split(root, ["nope"], "train")


def test_compaction_merges_parts_and_survives_a_crash(root: Path) -> None:
    for k in range(3):
        C.write_catalog_rows(
            root,
            synthetic_rows(n_per=2, lines=("L1",), days=("2026-11-29",), run_id=f"r{k}").set_column(
                0, S.IMAGE_ID, pa.array([f"r{k}-{i}" for i in range(2)])
            ),
            f"part-r{k}-00001",
        )
    before = C.read_catalog(root)
    folder = root / "catalog" / "line=L1" / "date=2026-11-29"
    assert len(list(folder.glob("part-*"))) == 3
    assert C.compact(root) == 1
    assert len(list(folder.glob("part-*"))) == 1
    pd.testing.assert_frame_equal(C.read_catalog(root), before)
    # crash after publishing the merged file but before removing an old part: readers see no duplicates
    C.write_catalog_rows(
        root,
        pq.read_table(next(folder.glob("part-*")))
        .append_column(S.LINE, pa.array(["L1"] * 6))
        .append_column(S.DATE, pa.array(["2026-11-29"] * 6)),
        "part-leftover",
    )
    pd.testing.assert_frame_equal(C.read_catalog(root), before)
    C.compact(root)
    assert len(list(folder.glob("part-*"))) == 1
    pd.testing.assert_frame_equal(C.read_catalog(root), before)


def test_stats(root: Path) -> None:
    q = pa.Table.from_pylist(
        [
            {
                S.PATH: f"/d/{i}",
                S.SOURCE_SIZE: 1,
                S.SOURCE_MTIME_NS: 1,
                S.SHA256: None,
                S.REASON_CODE: code,
                S.REASON: "r",
                S.QUARANTINED_TO: None,
                S.AT: pd.Timestamp("2026-11-27T00:00Z").to_pydatetime(),
                S.INGEST_RUN_ID: "x",
            }
            for i, code in enumerate(["zero_byte", "truncated", "zero_byte"])
        ],
        schema=S.QUARANTINE_SCHEMA,
    )
    C.append_table(root, "quarantine", q, "part-x")
    stats = C.catalog_stats(root)
    assert stats.n_images == 30 and stats.n_quarantined == 3
    assert stats.quarantine_by_reason == {"truncated": 1, "zero_byte": 2}
    assert {"line": "L1", "date": "2026-11-26", "images": 5} in stats.per_line_day and len(
        stats.per_line_day
    ) == 6
    assert (
        stats.storage_bytes["catalog"] > 0 and stats.storage_bytes["total"] >= stats.storage_bytes["catalog"]
    )
    assert stats.to_dict()["n_part_files"] == 6


def test_append_table_rejects_unknown_table(root: Path) -> None:
    with pytest.raises(ValueError, match="unknown side table"):
        C.append_table(root, "catalog", pa.table({"a": [1]}), "p")
    with pytest.raises(ValueError, match="unknown side table"):
        C.read_table(root, "nope")


def test_latents_schema() -> None:
    sch = S.latents_schema(3, ["score_mahalanobis"])
    assert sch.names == ["image_id", "model_id", "z_0", "z_1", "z_2", "score_mahalanobis"]
    assert sch.field("z_1").type == pa.float32() and S.schema_version_of(sch) == S.SCHEMA_VERSION
    with pytest.raises(ValueError):
        S.latents_schema(0)
    with pytest.raises(ValueError, match="clashes"):
        S.latents_schema(2, ["z_0"])


def test_default_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path))
    assert C.default_root() == tmp_path
    monkeypatch.delenv("LINEWATCH_HOME")
    assert C.default_root() == Path(".linewatch")


def test_lock_timeout_names_holder(tmp_path: Path) -> None:
    code = (
        "import sys, time\nfrom pipeline.catalog.tables import catalog_lock\n"
        "with catalog_lock(sys.argv[1], purpose='holder-x'):\n    print('held', flush=True)\n    time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(C.CatalogLockedError, match=f"pid {proc.pid} .*holder-x"):
            with C.catalog_lock(tmp_path, timeout=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()
    with C.catalog_lock(tmp_path, timeout=5):  # freed when its holder died
        assert C.lock_owner(tmp_path)["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------------ issue 14, item 12


def _more_parts(root: Path, n: int = 3) -> None:
    for k in range(n):
        C.write_catalog_rows(
            root,
            synthetic_rows(n_per=2, lines=("L1",), days=("2026-11-27",), run_id=f"m{k}").set_column(
                0, S.IMAGE_ID, pa.array([f"m{k}-{i}" for i in range(2)])
            ),
            f"part-m{k}-00001",
        )


@pytest.mark.parametrize("reader", ["read_catalog", "scan_catalog", "catalog_stats", "load_snapshot"])
def test_12_readers_during_compact_see_old_or_new_parts_never_a_missing_file(
    root: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """The compaction runs between a reader's listing of the part files and its read of them."""
    _more_parts(root)
    snap = C.snapshot({"lines": "L1"}, "before-compact", root)
    expected = C.read_catalog(root)
    real_list = C._partition_files
    fired = {"n": 0}

    def list_then_compact(*args, **kwargs):  # noqa: ANN002, ANN003
        files = real_list(*args, **kwargs)
        if not fired["n"]:
            fired["n"] += 1
            assert C.compact(root) >= 1  # the files just listed are gone now
        return files

    monkeypatch.setattr(C, "_partition_files", list_then_compact)
    if reader == "read_catalog":
        pd.testing.assert_frame_equal(C.read_catalog(root), expected)
    elif reader == "scan_catalog":
        assert C.scan_catalog(root, [S.IMAGE_ID]).num_rows == len(expected)
    elif reader == "catalog_stats":
        assert C.catalog_stats(root).n_images == len(expected)
    else:
        assert len(C.load_snapshot(root, snap.digest)) == snap.n_images
    assert fired["n"] == 1


def test_12_compact_under_a_held_lock_exits_3_with_one_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    code = (
        "import sys, time\nfrom pipeline.catalog.tables import catalog_lock\n"
        "with catalog_lock(sys.argv[1], purpose='ingest holder'):\n    print('held', flush=True)\n    time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert main(["catalog", "compact", "--root", str(root), "--lock-timeout", "0.2"]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ingest holder" in err[0] and "busy" in err[0]
        assert main(["catalog", "clean-tmp", "--root", str(root), "--lock-timeout", "0.2"]) == 3
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    finally:
        proc.kill()
        proc.wait()


def test_rewrite_rows_moves_rows_between_partitions_and_a_crash_is_finished_later(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = C.read_catalog(root)
    moved = pa.Table.from_pandas(before.iloc[:2].assign(**{S.DATE: "2026-10-01"}).assign(
        **{S.CAPTURED_AT: pd.Timestamp("2026-10-01T05:00:00Z")}), preserve_index=False)

    def crash(path):  # noqa: ANN001
        raise RuntimeError("killed between publish and removal")

    from pipeline.catalog import rewrite as R

    monkeypatch.setattr(R, "_remove_replaced", crash)
    with pytest.raises(RuntimeError):
        R.rewrite_rows(root, moved)
    monkeypatch.undo()
    assert list((root / "runs").glob("*.pending.json"))
    with C.catalog_lock(root):  # the next writer finishes the journal
        pass
    assert not list((root / "runs").glob("*.pending.json"))
    after = C.read_catalog(root)
    assert len(after) == len(before) and after[S.IMAGE_ID].is_unique
    assert set(after.loc[after[S.IMAGE_ID].isin(moved[S.IMAGE_ID].to_pylist()), S.DATE]) == {"2026-10-01"}
