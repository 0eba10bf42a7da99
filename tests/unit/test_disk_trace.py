"""bench/disk_trace.py: the rates it derives from the disk counters, and that it sees a real write."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from disk_trace import DiskTrace, whole_disks  # noqa: E402


def test_rates_per_step_from_the_samples():
    t = DiskTrace()
    t.disks = {"vdx"}
    mb = 1_000_000
    t.samples = [(10.0, 0, 0), (10.25, 100 * mb, 0), (10.5, 300 * mb, 50 * mb), (11.0, 300 * mb, 250 * mb)]
    rows = t.rows(step=0.5)
    assert [round(r[0], 2) for r in rows] == [0.5, 1.0]
    assert rows[0][1:] == pytest.approx((600.0, 100.0))
    assert rows[1][1:] == pytest.approx((0.0, 400.0))
    assert t.totals() == pytest.approx((0.3, 0.25))
    table = t.table(step=0.5)
    assert "0.30 GB read, 0.25 GB written" in table and "RRRRRRW" in table


@pytest.mark.skipif(not whole_disks(), reason="no whole disk in /sys/block (a container without one)")
def test_a_written_and_synced_file_shows_in_the_trace(tmp_path):
    data = os.urandom(8 << 20)
    with DiskTrace(interval=0.05) as t:
        with open(tmp_path / "f.bin", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    if t.totals()[1] == 0:
        pytest.skip(f"{tmp_path} is not on any of {sorted(t.disks)} (tmpfs or a network filesystem)")
    assert t.totals()[1] >= len(data) / 1e9 * 0.99
