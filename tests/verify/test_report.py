"""The one report: rows of error statistics, one verdict under the tolerance, table, dict and check()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from codegen_deploy.errors import ValidationError
from codegen_deploy.verify.report import Report, Row
from codegen_deploy.verify.tolerance import Tolerance

TOL = Tolerance(atol=1e-3, rtol=1e-2, min_top1=0.5)


def test_row_statistics_and_the_scale_relative_bound():
    row = Row("logits")
    a = np.array([[10.0, -2.0, 0.0], [1.0, 4.0, 0.0]])
    assert row.add(a, a + 0.1, TOL, top1=True)  # 0.1 <= 1e-3 + 1e-2 * 10
    assert row.max_abs == pytest.approx(0.1) and row.max_rel == pytest.approx(0.01)
    assert (row.top1_agree, row.top1_total) == (2, 2)
    b = a.copy()
    b[1] = [5.0, 0.0, 0.0]  # off by 4 where max|a| is 10: beyond, and row 1's top-1 flips
    assert not row.add(a, b, TOL, top1=True)
    assert not row.within and row.beyond == 1 and row.compared == 2 and (row.top1_agree, row.top1_total) == (3, 4)
    assert row.max_abs == pytest.approx(4.0) and row.max_rel == pytest.approx(0.4)


def test_nan_is_never_within():
    row = Row("present.0.key")
    assert not row.add(np.ones(4), np.array([1.0, np.nan, 1.0, 1.0]), TOL)
    assert math.isnan(row.max_abs)
    report = Report("graph", "reference", TOL, [row])
    assert not report.passed and math.isnan(report.max_abs)


def test_report_verdict_table_dict_and_check():
    good, bad = Row("logits"), Row("present.0.key")
    good.add(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]), TOL, top1=True)
    bad.add(np.ones(3), np.ones(3) * 2, TOL)
    report = Report("the float16 export", "the reference", TOL, [good, bad], notes=["a note"], info={"dtype": "x"})
    assert not report.passed and report.top1 == 1.0
    assert report.failures() == ["present.0.key beyond 0.001 + 0.01 * max|a| (max abs 1, max rel 1)"]
    table = report.table()
    assert "present.0.key" in table and "OVER" in table and "a note" in table and "FAILED:" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert (
        data["passed"] is False and data["dtype"] == "x" and [r["name"] for r in data["rows"]] == ["logits", bad.name]
    )
    assert data["rows"][0]["top1_total"] == 1 and "top1_total" not in data["rows"][1]
    with pytest.raises(ValidationError) as info:
        report.check()
    assert info.value.exit_code == 3 and info.value.report is report and "\n" not in str(info.value)
    assert str(info.value).startswith("the float16 export differs from the reference beyond tolerance (")


def test_top1_below_the_minimum_fails_and_greedy_rows():
    row = Row("0 (3 tokens)")
    row.add(np.array([1.0, 0.0]), np.array([0.0, 1.0]), Tolerance(atol=2.0, rtol=0.0, min_top1=0.5), top1=True)
    row.greedy = (0, 1)
    report = Report("b", "a", Tolerance(atol=2.0, rtol=0.0, min_top1=0.5), [row], kind="prompt")
    assert report.failures() == ["top-1 agreement 0.0% < 50%"]
    assert report.greedy_agreement == 0.0 and report.identical == 0 and "0/1" in report.table()


def test_an_empty_report_does_not_pass():
    assert not Report("b", "a", TOL).passed


def test_spread_error_is_zero_exact_one_for_doubled_or_flat_logits_and_decides_where_bounded():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.3, (6, 50))  # nearly flat logits, as random weights give
    bounded = Tolerance(atol=1.0, rtol=0.5, min_top1=0.0, max_spread_error=0.5)

    def report(b, tolerance=bounded):
        row = Row("logits")
        row.add(a, b, tolerance, top1=True)
        return Report("b", "a", tolerance, [row])

    assert report(a).spread_error == 0.0 and report(a + 3.0).spread_error == 0.0  # a shift changes no softmax
    doubled, flat = report(2 * a), report(np.zeros_like(a))
    assert doubled.spread_error == pytest.approx(1.0) and flat.spread_error == pytest.approx(1.0)
    assert doubled.rows[0].within  # max abs alone passes a graph with every logit doubled ...
    assert doubled.failures() == ["logits' error 1 of their spread > 0.5"]  # ... the spread error does not
    assert report(a + rng.normal(0, 0.05, a.shape)).passed
    data = doubled.to_dict()
    assert data["spread_error"] == pytest.approx(1.0) and data["tolerance"]["max_spread_error"] == 0.5
    assert "max_spread_error" not in report(a, TOL).to_dict()["tolerance"]  # float rows keep their three bounds
    assert "logits' error relative to their spread: 1" in doubled.table()
    assert math.isnan(report(np.full_like(a, np.nan)).spread_error) and not report(np.full_like(a, np.nan)).passed


def test_a_lossy_check_says_why_greedy_disagreement_passes():
    int8 = Tolerance(atol=1.0, rtol=0.5, min_top1=0.0, max_spread_error=0.25)
    row = Row("prompt 0")
    row.add(np.array([[5.0, 4.9, 0.0]]), np.array([[4.9, 5.0, 0.0]]), int8, top1=True)  # a near-tie flipped
    row.greedy = (0, 4)
    lossy = Report("int8", "torch", int8, [row])
    table = lossy.table()
    assert lossy.passed and table.endswith("PASSED")
    assert "0/4" in table and "top-1 and greedy agreement are informational" in table
    assert "informational" not in Report("fp32", "torch", TOL, [Row("prompt 0")]).table()
