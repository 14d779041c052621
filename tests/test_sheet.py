"""Slide sheet validation: every bad row is refused before any work, naming the row."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SheetError
from pipeline.slides.sheet import parse_sheet, read_sheet

HEADER = "slide_id\tpath\tlabel\tpatient_id\tmpp\tsplit\n"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_bom_crlf_and_trailing_spaces(base):
    text = "\ufeff" + HEADER.replace("\n", "\r\n") + "a \ta.svs\ttumor \tp1\t0.25 \ttest\r\nb\tb.svs\tnormal\tp2\t\t\r\n\r\n"
    rows = parse_sheet(text, base)
    assert [r.slide_id for r in rows] == ["a", "b"]
    assert rows[0].label == "tumor" and rows[0].mpp == 0.25 and rows[0].split == "test"
    assert rows[1].mpp is None and rows[1].split is None and rows[1].path == base / "b.svs"


@pytest.mark.parametrize("row,msg", [
    ("a\ta.svs\tt\tp1\t\t\na\tb.svs\tt\tp2\t\t\n", r"row 3: duplicate slide_id 'a' \(first on row 2\)"),
    ("x/y\ta.svs\tt\tp1\t\t\n", r"row 2: slide_id 'x/y' is not safe"),
    ("..\ta.svs\tt\tp1\t\t\n", r"row 2: slide_id '..' is not safe"),
    ("c\tmissing.svs\tt\tp1\t\t\n", r"row 2 \(c\): file not found"),
    ("a\ta.svs\tt\tp1\tabc\t\n", r"row 2 \(a\): mpp 'abc'"),
    ("a\ta.svs\tt\tp1\t\tvalid\n", r"row 2 \(a\): split 'valid'"),
    ("a\ta.svs\t\tp1\t\t\n", r"row 2 \(a\): empty label"),
])
def test_bad_rows_name_the_row(base, row, msg):
    with pytest.raises(SheetError, match=msg):
        parse_sheet(HEADER + row, base)


def test_unknown_label_and_columns_and_roots(base, tmp_path):
    with pytest.raises(SheetError, match="label 'x' is not one of"):
        parse_sheet(HEADER + "a\ta.svs\tx\tp1\t\t\n", base, labels=["tumor", "normal"])
    with pytest.raises(SheetError, match=r"unknown column\(s\) \['colour'\]"):
        parse_sheet("slide_id\tpath\tlabel\tpatient_id\tcolour\n", base)
    with pytest.raises(SheetError, match="missing column"):
        parse_sheet("slide_id\tpath\n", base)
    with pytest.raises(SheetError, match="outside the allowed roots"):
        parse_sheet(HEADER + "a\t/etc/passwd\tt\tp1\t\t\n", base, allowed_roots=[base])


def test_read_sheet_resolves_relative_to_sheet(base):
    (base / "s.tsv").write_text(HEADER + "a\ta.svs\tt\tp1\t\t\n")
    assert read_sheet(base / "s.tsv")[0].path == (base / "a.svs").resolve()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_fuzz_sheet_parser_only_raises_sheet_errors(text):
    try:
        rows = parse_sheet(text, Path("/nonexistent"), check_files=False)
    except SheetError as e:
        assert "\n" not in str(e).strip() or str(e).startswith("slide sheet")
    else:
        assert len({r.slide_id for r in rows}) == len(rows)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
                          st.sampled_from(["tumor", "normal"]), st.sampled_from(["", "0.25", "1", "train", "test"])),
                min_size=1, max_size=8))
def test_fuzz_valid_sheets_round_trip(rows):
    text = HEADER + "".join(f"{sid}\t{sid}.svs\t{lab}\tp\t{x if x[0:1].isdigit() else ''}\t{x if x.isalpha() else ''}\n"
                            for sid, lab, x in rows)
    ids = [r[0] for r in rows]
    if len(set(ids)) < len(ids) or any(".." in i for i in ids):
        with pytest.raises(SheetError):
            parse_sheet(text, Path("/x"), check_files=False)
    else:
        assert [r.slide_id for r in parse_sheet(text, Path("/x"), check_files=False)] == ids
