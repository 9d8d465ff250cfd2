"""The MES export's sample_kind and golden_cell fields: validated per row, never a crash."""

from __future__ import annotations

from pathlib import Path

from pipeline.catalog.mes import MES_FLAGS, MesCache, read_mes_export
from pipeline.common import schemas as S

HEAD = "serial,timestamp,line,station,product_type,sample_kind,golden_cell\n"


def test_sample_kind_and_golden_cell_are_validated_per_row(tmp_path: Path) -> None:
    p = tmp_path / "mes_export.csv"
    p.write_text(HEAD
                 + "A,2026-01-01T00:00:00Z,L1,S1,mono,golden,G01\n"
                 + "B,2026-01-01T00:01:00Z,L1,S1,mono, Golden ,G02\n"
                 + "C,2026-01-01T00:02:00Z,L1,S1,mono,,\n"
                 + "D,2026-01-01T00:03:00Z,L1,S1,mono,production,G09\n"
                 + "E,2026-01-01T00:04:00Z,L1,S1,mono,reference,G01\n"
                 + "F,2026-01-01T00:05:00Z,L1,S1,mono,golden,\n"
                 + "G,2026-01-01T00:06:00Z,L1,S1,mono,golden,=cmd|calc\n")
    rows = read_mes_export(p)
    assert (rows["A"].sample_kind, rows["A"].golden_cell, rows["A"].flags) == ("golden", "G01", ())
    assert (rows["B"].sample_kind, rows["B"].golden_cell) == ("golden", "G02")  # case and blanks forgiven
    assert (rows["C"].sample_kind, rows["C"].golden_cell, rows["C"].flags) == ("production", None, ())
    assert (rows["D"].sample_kind, rows["D"].golden_cell) == ("production", None)  # a production row has no cell
    # an unknown kind: the row stays, taken as production, with its reason
    assert (rows["E"].sample_kind, rows["E"].flags) == ("production", ("bad_mes_sample_kind",))
    # a golden row without a usable id stays golden (never trains) but cannot be paired
    assert (rows["F"].sample_kind, rows["F"].golden_cell, rows["F"].flags) == ("golden", None, ("bad_mes_golden_cell",))
    assert (rows["G"].golden_cell, rows["G"].flags) == (None, ("bad_mes_golden_cell",))
    assert {"bad_mes_sample_kind", "bad_mes_golden_cell"} <= MES_FLAGS


def test_an_export_without_the_columns_is_all_production(tmp_path: Path) -> None:
    p = tmp_path / "mes_export.csv"
    p.write_text("serial,timestamp,line,station,product_type\nA,2026-01-01T00:00:00Z,L1,S1,mono\n")
    assert (read_mes_export(p)["A"].sample_kind, read_mes_export(p)["A"].golden_cell) == ("production", None)


def test_problems_name_the_file_and_the_reason(tmp_path: Path) -> None:
    (tmp_path / "mes_export.csv").write_text(HEAD + "E,2026-01-01T00:04:00Z,L1,S1,mono,reference,\n")
    cache = MesCache("mes_export.csv")
    row, flags = cache.lookup(str(tmp_path), "E")
    cache.count(flags, "E.png")
    assert row is not None and cache.flag_counts == {"bad_mes_sample_kind": 1}
    assert "E.png" in cache.problems[0] and "sample_kind" in cache.problems[0] and "production" in cache.problems[0]
    assert S.parse_sample_kind(None) == S.parse_sample_kind(float("nan")) == "production"
