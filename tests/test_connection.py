"""Outages as the daemon's loops see them: how long Redis was away or refusing us."""

from __future__ import annotations

import pytest

from processor.connection import Downtime


def test_downtime_counts_the_time_some_outage_was_on_once() -> None:
    downtime = Downtime()
    writes, beats = object(), object()
    downtime.begin(writes, now=10.0)
    downtime.begin(beats, now=11.0)  # overlapping outages count once
    assert downtime.total_s(now=12.0) == pytest.approx(2.0)
    downtime.end(writes, now=13.0)
    assert downtime.total_s(now=14.0) == pytest.approx(4.0)  # beats still out
    downtime.end(beats, now=15.0)
    downtime.end(beats, now=16.0)  # an outage ends once
    assert downtime.total_s(now=20.0) == pytest.approx(5.0)
    downtime.begin(writes, now=30.0)
    assert downtime.total_s(now=31.5) == pytest.approx(6.5)
