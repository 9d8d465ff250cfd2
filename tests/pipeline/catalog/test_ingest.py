"""Exactly-once ingestion: every bad input quarantined with its reason, no good image lost or doubled."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.catalog import tables as C
from pipeline.catalog.ingest import (
    REASONS,
    IngestConfig,
    IngestSummary,
    ingest,
    read_mes_export,
    validate_bytes,
)
from pipeline.common import schemas as S

REPO = Path(__file__).resolve().parents[3]
DAY = "2026-11-27"


# --------------------------------------------------------------------------------------------------------------
# helpers: small images made here (no ELPV copies in the repo)


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def gray(seed: int, size: tuple[int, int] = (48, 48), dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = 65535 if dtype == np.uint16 else 255
    return rng.integers(0, hi, size=size, dtype=dtype)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_drop(tmp: Path, n: int = 4, line: str = "L1", day: str = DAY, start_seed: int = 0) -> list[Path]:
    folder = tmp / "drop" / line / day
    return [write(folder / f"S{start_seed + i:05d}.png", png_bytes(gray(start_seed + i))) for i in range(n)]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims a huge image (decoding it would need ~10 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    data = bytearray(png_bytes(gray(99, (64, 64))))
    mid = len(data) // 2
    data[mid : mid + 40] = b"\x00" * 40  # IDAT payload damaged, checksum no longer matches, IEND intact
    return bytes(data)


def read_all(root: Path) -> pd.DataFrame:
    return C.read_catalog(root)


def quarantine_by_name(root: Path) -> dict[str, str]:
    q = C.read_table(root, "quarantine")
    return {Path(p).name: code for p, code in zip(q[S.PATH], q[S.REASON_CODE], strict=True)}


# --------------------------------------------------------------------------------------------------------------
# bad inputs, one at a time: clear reason, quarantined, good image still registered once

BAD_CASES = {
    "corrupt": ("cell_corrupt.png", corrupt_png, "corrupt", "decoder"),
    "truncated_png": ("cell_trunc.png", lambda: png_bytes(gray(5, (64, 64)))[:300], "truncated", "IEND"),
    "truncated_png_tail": ("cell_tail.png", lambda: png_bytes(gray(6, (64, 64)))[:-4], "truncated", "IEND"),
    "truncated_jpeg": (
        "cell_trunc.jpg",
        lambda: png_bytes(gray(7, (64, 64)), "JPEG")[:400],
        "truncated",
        "ends",
    ),
    "zero_byte": ("cell_empty.png", lambda: b"", "zero_byte", "empty"),
    "text_named_png": ("cell_text.png", lambda: b"serial,timestamp\nS1,2026\n", "not_an_image", "not PNG"),
    "decompression_bomb": ("cell_bomb.png", bomb_png, "decompression_bomb", "10,000,000,000"),
    "too_small": ("cell_small.png", lambda: png_bytes(gray(8, (8, 8))), "too_small", "8x8"),
    "too_large": ("cell_wide.png", lambda: png_bytes(gray(9, (40, 5000))), "too_large", "5000x40"),
    "palette": ("cell_pal.png", lambda: png_bytes_mode("P"), "unsupported_mode", "'P'"),
    "float_tiff": (
        "cell_float.tif",
        lambda: png_bytes(np.zeros((64, 64), np.float32), "TIFF"),
        "unsupported_mode",
        "'F'",
    ),
    "gif": ("cell.gif", lambda: png_bytes(gray(10), "GIF"), "bad_extension", ".gif"),
    "no_extension": ("cell_noext", lambda: png_bytes(gray(11)), "bad_extension", "(none)"),
    "jpeg_named_png": ("cell_jpg.png", lambda: png_bytes(gray(12), "JPEG"), "extension_mismatch", "JPEG"),
    "space_in_name": ("cell 1.png", lambda: png_bytes(gray(13)), "bad_filename", "characters"),
    "hidden_name": (".cell.png", lambda: png_bytes(gray(14)), "bad_filename", "dot"),
    "dash_name": ("-rf.png", lambda: png_bytes(gray(15)), "bad_filename", "dash"),
    "unicode_name": ("zelle_\u00e4.png", lambda: png_bytes(gray(16)), "bad_filename", "characters"),
    "control_char": ("cell\nx.png", lambda: png_bytes(gray(17)), "bad_filename", "characters"),
    "long_name": ("c" * 200 + ".png", lambda: png_bytes(gray(18)), "bad_filename", "characters long"),
}


def png_bytes_mode(mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray(20, (64, 64))).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_input_is_quarantined_with_its_reason(tmp_path: Path, case: str) -> None:
    name, make, code, needle = BAD_CASES[case]
    goods = make_drop(tmp_path, n=2)
    bad = write(tmp_path / "drop" / "L1" / DAY / name, make())
    before = bad.read_bytes()
    root = tmp_path / "root"

    summary = ingest(tmp_path / "drop", root, progress=False)

    assert summary.registered == 2
    assert summary.quarantined == {code: 1}
    q = C.read_table(root, "quarantine")
    assert list(q[S.REASON_CODE]) == [code]
    assert needle in q[S.REASON].iloc[0], q[S.REASON].iloc[0]
    assert code in REASONS
    # copy mode: the reject is still in the drop folder, unchanged, and a copy is in quarantine
    assert bad.read_bytes() == before
    copied = Path(q[S.QUARANTINED_TO].iloc[0])
    assert copied.is_file() and copied.read_bytes() == before
    assert copied.is_relative_to(root / "quarantine" / summary.run_id)
    # good images registered exactly once
    cat = read_all(root)
    assert sorted(Path(p).name for p in cat[S.SOURCE_PATH]) == sorted(g.name for g in goods)
    assert cat[S.IMAGE_ID].is_unique


def test_all_bad_inputs_together_in_one_run(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=5)
    folder = tmp_path / "drop" / "L1" / DAY
    for name, make, _code, _ in BAD_CASES.values():
        write(folder / name, make())
    root = tmp_path / "root"
    summary = ingest(tmp_path / "drop", root, progress=False, config=IngestConfig(workers=2))
    expected = {name: code for name, _m, code, _ in BAD_CASES.values()}
    assert quarantine_by_name(root) == expected
    assert summary.registered == len(goods)
    assert summary.n_quarantined == len(BAD_CASES)


def test_accepted_variants_16bit_rgb_jpeg_tiff_bmp(tmp_path: Path) -> None:
    folder = tmp_path / "drop" / "L1" / DAY
    write(folder / "g16.png", png_bytes(gray(1, (40, 50), np.uint16)))
    write(folder / "g16.tif", png_bytes(gray(2, (40, 50), np.uint16), "TIFF"))
    rgb = np.stack([gray(3), gray(4), gray(5)], axis=-1)
    write(folder / "rgb.png", png_bytes(rgb))
    write(folder / "g8.jpg", png_bytes(gray(6), "JPEG"))
    write(folder / "g8.bmp", png_bytes(gray(7), "BMP"))
    root = tmp_path / "root"
    summary = ingest(tmp_path / "drop", root, progress=False)
    assert summary.registered == 5 and summary.n_quarantined == 0
    cat = read_all(root).set_index(read_all(root)[S.SOURCE_PATH].map(lambda p: Path(p).name))
    assert cat.loc["g16.png", S.BIT_DEPTH] == 16 and cat.loc["g16.png", S.MODE].startswith("I;16")
    assert (cat.loc["g16.png", S.WIDTH], cat.loc["g16.png", S.HEIGHT]) == (50, 40)
    assert cat.loc["g16.tif", S.BIT_DEPTH] == 16
    assert bool(cat.loc["rgb.png", S.CONVERTED_FROM_RGB]) and "converted_from_rgb" in list(
        cat.loc["rgb.png", S.FLAGS]
    )
    assert cat.loc["rgb.png", S.BIT_DEPTH] == 8
    assert not cat.loc[["g8.jpg", "g8.bmp", "g16.png"], S.CONVERTED_FROM_RGB].any()
    # the store holds the original bytes under their sha256 and the right extension
    for name, row in cat.iterrows():
        stored = C.resolve_store_path(root, row[S.STORE_PATH])
        assert stored.read_bytes() == (folder / name).read_bytes()
        assert stored.suffix in (".png", ".tif", ".jpg", ".bmp")


def test_symlinks_are_rejected_inside_and_outside(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=2)
    folder = tmp_path / "drop" / "L1" / DAY
    outside = write(tmp_path / "secret" / "outside.png", png_bytes(gray(50)))
    (folder / "inside_link.png").symlink_to(goods[0])
    (folder / "escape_link.png").symlink_to(outside)
    (folder / "etc_link.png").symlink_to("/etc/passwd")
    (tmp_path / "drop" / "L1" / "2026-11-28").symlink_to(outside.parent, target_is_directory=True)
    root = tmp_path / "root"
    summary = ingest(tmp_path / "drop", root, progress=False)
    assert quarantine_by_name(root) == {
        "inside_link.png": "symlink",
        "escape_link.png": "path_escape",
        "etc_link.png": "path_escape",
        "2026-11-28": "path_escape",
    }
    assert summary.registered == 2
    # nothing outside the drop folder was read into the store or the quarantine
    q = C.read_table(root, "quarantine")
    assert q[S.SHA256].isna().all()
    for dest in q[S.QUARANTINED_TO].dropna():
        assert Path(dest).is_symlink()  # the link itself was kept, never its target
    assert not any("outside" in str(p) for p in (root / "store").rglob("*"))


def test_duplicate_bytes_are_recorded_not_registered(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=3)
    folder = tmp_path / "drop" / "L1" / DAY
    shutil.copyfile(goods[1], folder / "copy_of_1.png")
    root = tmp_path / "root"
    s1 = ingest(tmp_path / "drop", root, progress=False)
    assert (s1.registered, s1.duplicates) == (3, 1)
    # a later run sees the same bytes again in another folder
    other = tmp_path / "drop" / "L2" / "2026-11-28"
    shutil.copyfile(goods[2], write(other / "x.png", b"placeholder"))
    s2 = ingest(tmp_path / "drop", root, progress=False)
    assert (s2.registered, s2.duplicates) == (0, 1)
    dups = C.read_table(root, "duplicates")
    cat = read_all(root)
    assert len(cat) == 3 and cat[S.SHA256].is_unique
    id_of = dict(zip(cat[S.SHA256], cat[S.IMAGE_ID], strict=True))
    assert sorted(Path(p).name for p in dups[S.SOURCE_PATH]) == ["copy_of_1.png", "x.png"]
    assert all(id_of[s] == d for s, d in zip(dups[S.SHA256], dups[S.DUPLICATE_OF], strict=True))


def test_rerun_is_idempotent_and_touch_does_not_reregister(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=4)
    write(tmp_path / "drop" / "L1" / DAY / "bad.png", b"nope")
    shutil.copyfile(goods[0], tmp_path / "drop" / "L1" / DAY / "dup.png")
    root = tmp_path / "root"
    s1 = ingest(tmp_path / "drop", root, progress=False)
    before = read_all(root)
    s2 = ingest(tmp_path / "drop", root, progress=False)
    assert (s2.registered, s2.duplicates, s2.n_quarantined) == (0, 0, 0)
    assert s2.skipped_already_registered == s1.registered == 4
    assert s2.skipped_already_seen == 2
    os.utime(goods[2], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: mtime changes, bytes do not
    s3 = ingest(tmp_path / "drop", root, progress=False)
    assert (s3.registered, s3.duplicates) == (0, 0)
    pd.testing.assert_frame_equal(read_all(root), before)
    assert len(C.read_table(root, "quarantine")) == 1 and len(C.read_table(root, "duplicates")) == 1
    runs = sorted((root / "runs").glob("*.json"))
    assert [json.loads(p.read_text())["registered"] for p in runs] == [4, 0, 0]


def test_new_files_in_later_runs_are_picked_up(tmp_path: Path) -> None:
    make_drop(tmp_path, n=3)
    root = tmp_path / "root"
    ingest(tmp_path / "drop", root, progress=False)
    make_drop(tmp_path, n=2, day="2026-11-28", start_seed=100)
    s2 = ingest(tmp_path / "drop", root, progress=False)
    assert s2.registered == 2 and s2.skipped_already_registered == 3
    assert len(read_all(root)) == 5


def test_mes_export_gives_timestamp_line_station_else_file_time(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=3)
    folder = goods[0].parent
    (folder / "mes_export.csv").write_text(
        "serial,timestamp,line,station,product_type\n"
        "S00000,2026-11-27T23:30:00+01:00,L1,ST3,mono\n"
        "S00001,2026-11-27T10:15:00Z,L1,ST4,poly\n"
    )
    mtime = pd.Timestamp("2026-11-20T12:00:00Z")
    os.utime(goods[2], ns=(mtime.value, mtime.value))
    root = tmp_path / "root"
    summary = ingest(tmp_path / "drop", root, progress=False)
    assert summary.timestamp_sources == {"file_mtime": 1, "mes": 2}
    cat = read_all(root).set_index(S.SOURCE_PATH)
    r0, r1, r2 = (cat.loc[str(g)] for g in goods)
    assert r0[S.CAPTURED_AT] == pd.Timestamp("2026-11-27T22:30:00Z") and r0[S.STATION] == "ST3"
    assert r0[S.TIMESTAMP_SOURCE] == "mes" and r0[S.PRODUCT_TYPE] == "mono" and r0[S.DATE] == "2026-11-27"
    assert r1[S.CAPTURED_AT] == pd.Timestamp("2026-11-27T10:15:00Z") and r1[S.STATION] == "ST4"
    assert r2[S.TIMESTAMP_SOURCE] == "file_mtime" and r2[S.CAPTURED_AT] == mtime
    assert r2[S.STATION] == "unknown" and pd.isna(r2[S.PRODUCT_TYPE]) and r2[S.DATE] == "2026-11-20"
    assert set(cat[S.LINE]) == {"L1"}
    assert (folder / "mes_export.csv").exists()  # metadata is not quarantined


def test_read_mes_export_flags_naive_and_bad_timestamps(tmp_path: Path) -> None:
    p = tmp_path / "mes.csv"
    p.write_text(
        "serial,timestamp,line,station,product_type\nA,2026-01-01T00:00:00,L1,S1,\nB,yesterday,L1,S1,x\n"
    )
    rows = read_mes_export(p)
    assert rows["A"].flags == ("naive_mes_timestamp",) and rows["A"].captured_at.tzinfo is not None
    assert rows["B"].captured_at is None and rows["B"].flags == ("bad_mes_timestamp",)
    p.write_text("id,timestamp\n1,2\n")
    with pytest.raises(ValueError, match="serial"):
        read_mes_export(p)


def test_line_filter_and_missing_line(tmp_path: Path) -> None:
    make_drop(tmp_path, n=2, line="L1")
    make_drop(tmp_path, n=3, line="L2", start_seed=10)
    root = tmp_path / "root"
    s = ingest(tmp_path / "drop", root, line="L2", progress=False)
    assert s.registered == 3 and set(read_all(root)[S.LINE]) == {"L2"}
    with pytest.raises(ValueError, match="no folder for line"):
        ingest(tmp_path / "drop", root, line="L7", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        ingest(tmp_path / "nope", root, progress=False)


def test_move_mode_and_delete_source(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=2)
    bad = write(goods[0].parent / "bad.png", b"")
    root = tmp_path / "root"
    ingest(tmp_path / "drop", root, progress=False, config=IngestConfig(quarantine_mode="move"))
    assert not bad.exists() and all(g.exists() for g in goods)
    dest = Path(C.read_table(root, "quarantine")[S.QUARANTINED_TO].iloc[0])
    assert dest.exists()
    more = make_drop(tmp_path, n=2, day="2026-11-29", start_seed=40)
    ingest(tmp_path / "drop", root, progress=False, config=IngestConfig(delete_source=True))
    assert not any(m.exists() for m in more)
    assert all(g.exists() for g in goods)  # registered by the first run, untouched by the second
    for row in read_all(root).itertuples():
        assert C.resolve_store_path(root, row.store_path).is_file()  # the store does not need the drop folder


def test_default_run_never_changes_the_drop_folder(tmp_path: Path) -> None:
    make_drop(tmp_path, n=3)
    write(tmp_path / "drop" / "L1" / DAY / "bad.png", b"x")
    snap = {p: p.read_bytes() for p in (tmp_path / "drop").rglob("*") if p.is_file()}
    ingest(tmp_path / "drop", tmp_path / "root", progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "drop").rglob("*") if p.is_file()} == snap


def test_validate_bytes_direct() -> None:
    cfg = IngestConfig()
    assert validate_bytes(png_bytes(gray(1)), "png", cfg) == (48, 48, "L", 8, ())
    assert validate_bytes(bomb_png(), "png", cfg).code == "decompression_bomb"
    assert (
        validate_bytes(png_bytes(gray(1)), "png", IngestConfig(max_pixels=100)).code == "decompression_bomb"
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="quarantine_mode"):
        IngestConfig(quarantine_mode="delete")
    with pytest.raises(ValueError, match="min <= max"):
        IngestConfig(min_width=100, max_width=10)
    with pytest.raises(ValueError, match="leading dot"):
        IngestConfig(allowed_extensions=("png",))


def test_summary_to_dict_is_json() -> None:
    s = IngestSummary("r", 1, 2, 3, 4, {"zero_byte": 2}, 1.5, 10.0)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["n_quarantined"] == 2 and d["registered"] == 1


# --------------------------------------------------------------------------------------------------------------
# crash safety


class Crash(Exception):
    pass


def test_crash_between_store_write_and_publish_then_rerun(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=7)
    shutil.copyfile(goods[0], goods[0].parent / "dup.png")
    root = tmp_path / "root"
    cfg = IngestConfig(batch_size=3, workers=1)
    calls = {"n": 0}

    def crash_on_second_batch(point: str) -> None:
        if point == "before_publish":
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("simulated crash after store writes, before publish")

    with pytest.raises(Crash):
        ingest(tmp_path / "drop", root, progress=False, config=cfg, crash_hook=crash_on_second_batch)
    # the catalog is readable and holds exactly the first batch; later store objects exist unreferenced
    partial = read_all(root)
    assert len(partial) == 3
    assert len(list((root / "store").rglob("*.png"))) >= 5
    summary = ingest(tmp_path / "drop", root, progress=False, config=cfg)
    assert summary.registered == 4 and summary.duplicates == 1 and summary.skipped_already_registered == 3
    cat = read_all(root)
    assert len(cat) == 7 and cat[S.SHA256].is_unique and cat[S.SOURCE_PATH].is_unique
    assert len(C.read_table(root, "duplicates")) == 1


def test_crash_env_hook_exits_before_publish_in_subprocess(tmp_path: Path) -> None:
    make_drop(tmp_path, n=3)
    root = tmp_path / "root"
    code = f"from pipeline.catalog.ingest import ingest; ingest({str(tmp_path / 'drop')!r}, {str(root)!r}, progress=False)"
    env = {**os.environ, "LINEWATCH_TEST_CRASH_AT": "before_publish"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 70
    assert len(read_all(root)) == 0 and len(list((root / "store").rglob("*.png"))) == 3
    assert ingest(tmp_path / "drop", root, progress=False).registered == 3
    assert len(read_all(root)) == 3


_SLOW_INGEST = """
import sys, time
from pipeline.catalog.ingest import IngestConfig, ingest
def hook(point):
    if point == "after_publish":
        time.sleep(0.15)
ingest(sys.argv[1], sys.argv[2], progress=False, config=IngestConfig(batch_size=2, workers=1), crash_hook=hook)
"""


@pytest.mark.timeout(180)
def test_sigkill_mid_run_leaves_readable_catalog_and_rerun_completes(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=30)
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INGEST, str(tmp_path / "drop"), str(root)], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((root / "catalog").rglob("part-*.parquet"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = read_all(root)  # readable after kill -9
    assert 0 < len(partial) < len(goods)
    summary = ingest(tmp_path / "drop", root, progress=False)  # the lock died with its holder
    cat = read_all(root)
    assert len(cat) == len(goods) and cat[S.SHA256].is_unique
    assert summary.registered == len(goods) - len(partial)
    assert len(C.read_table(root, "duplicates")) == 0


# --------------------------------------------------------------------------------------------------------------
# concurrency


def test_second_ingest_fails_clearly_while_lock_held(tmp_path: Path) -> None:
    make_drop(tmp_path, n=2)
    root = tmp_path / "root"
    code = (
        "import sys, time\nfrom pipeline.catalog.tables import catalog_lock\n"
        "with catalog_lock(sys.argv[1], purpose='ingest test-holder'):\n"
        "    print('held', flush=True)\n    time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(C.CatalogLockedError, match=f"pid {holder.pid}.*ingest test-holder"):
            ingest(tmp_path / "drop", root, progress=False, config=IngestConfig(lock_timeout=0.3))
    finally:
        holder.kill()
        holder.wait()
    assert ingest(tmp_path / "drop", root, progress=False).registered == 2


_INGEST_JSON = """
import json, sys
from pipeline.catalog.ingest import IngestConfig, ingest
s = ingest(sys.argv[1], sys.argv[2], progress=False, config=IngestConfig(lock_timeout=120, batch_size=4))
print(json.dumps(s.to_dict()))
"""


@pytest.mark.timeout(180)
def test_concurrent_ingests_serialise_and_register_once(tmp_path: Path) -> None:
    goods = make_drop(tmp_path, n=20)
    root = tmp_path / "root"
    args = [sys.executable, "-c", _INGEST_JSON, str(tmp_path / "drop"), str(root)]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=150)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["registered"] for o in outs) == [0, len(goods)]
    assert sum(o["duplicates"] for o in outs) == 0
    cat = read_all(root)
    assert len(cat) == len(goods) and cat[S.SHA256].is_unique


# --------------------------------------------------------------------------------------------------------------
# realism: a few real ELPV cells (loaded from the installed package, never copied into the repo)


@pytest.fixture
def elpv_cells(elpv_small) -> np.ndarray:  # noqa: ANN001 - session fixture from tests/conftest.py
    return elpv_small.images[:12]


def test_real_elpv_cells_register_with_their_shape(tmp_path: Path, elpv_cells: np.ndarray) -> None:
    folder = tmp_path / "drop" / "L1" / DAY
    for i, img in enumerate(elpv_cells):
        write(folder / f"E{i:04d}.png", png_bytes(img))
    shutil.copyfile(folder / "E0003.png", folder / "E9999.png")
    root = tmp_path / "root"
    s = ingest(tmp_path / "drop", root, progress=False)
    assert (s.registered, s.duplicates, s.n_quarantined) == (len(elpv_cells), 1, 0)
    cat = read_all(root)
    assert set(zip(cat[S.WIDTH], cat[S.HEIGHT], strict=True)) == {(300, 300)}
    assert set(cat[S.MODE]) == {"L"}
    # round trip: the stored bytes decode to the original pixels
    row = cat[cat[S.SOURCE_PATH].str.endswith("E0005.png")].iloc[0]
    with Image.open(C.resolve_store_path(root, row[S.STORE_PATH])) as im:
        np.testing.assert_array_equal(np.asarray(im), elpv_cells[5])


def test_unexpected_decoder_error_is_a_reject(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PngImagePlugin

    def boom(self):  # noqa: ANN001
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", boom)
    rej = validate_bytes(png_bytes(gray(1)), "png", IngestConfig())
    assert rej.code == "corrupt" and "decoder exploded" in rej.reason


def test_store_failure_aborts_instead_of_quarantining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pipeline.catalog.store import ContentStore

    make_drop(tmp_path, n=3)

    def full(self, data, ext, *, sha256=None):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ContentStore, "put", full)
    with pytest.raises(OSError, match="No space"):
        ingest(tmp_path / "drop", tmp_path / "root", progress=False, config=IngestConfig(workers=1))
    assert C.read_table(tmp_path / "root", "quarantine").empty and read_all(tmp_path / "root").empty


def test_golden_captures_are_registered_apart_and_old_catalogs_still_load(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    goods = make_drop(tmp_path, n=4)
    folder = goods[0].parent
    (folder / "mes_export.csv").write_text(
        "serial,timestamp,line,station,product_type,sample_kind,golden_cell\n"
        "S00000,2026-11-27T08:01:00+01:00,L1,ST1,mono,golden,G01\n"
        "S00001,2026-11-27T08:02:00+01:00,L1,ST1,mono,golden,G02\n"
        "S00002,2026-11-27T09:00:00+01:00,L1,ST1,mono,production,\n"
        "S00003,2026-11-27T09:01:00+01:00,L1,ST1,mono,gold,\n"
    )
    root = tmp_path / "root"
    summary = ingest(tmp_path / "drop", root, progress=False)
    assert summary.mes_flags == {"bad_mes_sample_kind": 1} and "sample_kind" in summary.mes_problems[0]
    cat = read_all(root).set_index(S.SOURCE_PATH)
    kinds = [cat.loc[str(g), S.SAMPLE_KIND] for g in goods]
    assert kinds == ["golden", "golden", "production", "production"]
    assert [cat.loc[str(g), S.GOLDEN_CELL] for g in goods[:2]] == ["G01", "G02"]
    assert "bad_mes_sample_kind" in cat.loc[str(goods[3]), S.FLAGS]
    assert S.golden_mask(read_all(root)).sum() == 2

    # a part file written before the columns existed still loads: its rows are production
    for part in (root / C.CATALOG_DIR).rglob("part-*.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.drop_columns([S.SAMPLE_KIND, S.GOLDEN_CELL]), part)
    old = read_all(root)
    assert old[S.SAMPLE_KIND].isna().all() and not S.golden_mask(old).any() and len(old) == 4

    # re-reading the MES exports fills the columns in again
    from pipeline.catalog.ingest import refresh_metadata

    refresh_metadata(tmp_path / "drop", root)
    assert S.golden_mask(read_all(root)).sum() == 2
