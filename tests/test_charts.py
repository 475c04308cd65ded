"""Dashboard charts: server-rendered SVG that shows the figures it was given."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from web.charts import Series, line_chart, nice_ceiling

START = datetime(2026, 12, 1, 18, 0)
TIMES = [START + timedelta(minutes=10 * i) for i in range(4)]


def test_axis_tops_are_round_numbers():
    assert [nice_ceiling(v) for v in (0, 0.3, 1, 7, 12, 180, 2400)] == [1, 0.5, 1, 10, 20, 200, 2500]


def test_points_scale_to_the_axis_and_gaps_break_the_line():
    svg = str(line_chart(TIMES, [Series("jobs/min", [0, 5, None, 10])], title="Jobs per minute",
                         chart_id="jobs-chart"))
    assert svg.startswith('<figure class="chart" id="jobs-chart">') and "<svg" in svg
    assert ">10<" in svg and ">0<" in svg and ">18:00<" in svg and ">18:30<" in svg
    ys = [float(y) for y in re.findall(r'<circle[^>]* cy="([\d.]+)"', svg)]
    assert len(ys) == 3 and ys[0] > ys[1] > ys[2]  # 0, 5, 10 drawn bottom to top
    assert svg.count("<polyline") == 1  # the None bucket splits 0-5 from the lone 10
    assert "18:10 jobs/min: 5.0</title>" in svg


def test_empty_chart_says_so_and_titles_are_escaped():
    svg = str(line_chart(TIMES, [Series("a", [None] * 4), Series("b<", [None] * 4, "s2")],
                         title="<p95>", unit="ms", empty_text="no finished jobs in the last 6 hours"))
    assert "no finished jobs in the last 6 hours" in svg and "<circle" not in svg
    assert "&lt;p95&gt;" in svg and "<p95>" not in svg and "b&lt;" in svg


def test_percent_axis_is_fixed_at_100():
    svg = str(line_chart(TIMES, [Series("hit rate", [25, 50, 75, 100])], title="Cache hits", unit="%",
                         y_max=100))
    assert ">100%<" in svg and ">50%<" in svg and "18:30 hit rate: 100%</title>" in svg
