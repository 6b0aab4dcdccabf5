"""Back pressure on the queue disk (queue/pressure.py): Exchange's thresholds, the levels' hysteresis, what
each level refuses, and the reserve that lets a full queue record its deliveries."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from mailgate.errors import UserError
from mailgate.home import BackPressureSettings
from mailgate.queue.pressure import (EXCHANGE_RESERVE_BYTES, HIGH, MEDIUM, NORMAL, RESERVE_MAX_BYTES, DiskPressure,
                                     Usage, high_threshold, is_disk_full)

GB = 1024 ** 3


class FakeDisk:
    def __init__(self, total: int, used_percent: float) -> None:
        self.total = total
        self.set(used_percent)

    def set(self, used_percent: float) -> None:
        self.free = int(self.total * (100 - used_percent) / 100)

    def __call__(self, path) -> Usage:
        return Usage(total=self.total, free=self.free)


def test_exchange_rule_leaves_500_mb_and_never_goes_above_99_percent():
    assert high_threshold(10 * GB) == round(100 * (10 * GB - EXCHANGE_RESERVE_BYTES) / (10 * GB)) == 95
    assert high_threshold(2 * GB) == 76
    assert high_threshold(1000 * GB) == 99
    assert high_threshold(10 * GB, configured=80) == 80


def test_levels_rise_at_their_thresholds_and_fall_only_below_the_next_one_down(tmp_path):
    disk = FakeDisk(10 * GB, 50)
    bp = DiskPressure(tmp_path, usage=disk)                  # 10 GB: Normal 91, Medium 93, High 95
    assert bp.thresholds(disk.total) == (91, 93, 95)
    seen = []
    for used in (50, 92, 93, 94, 95, 94, 93, 92, 91, 90, 93):
        disk.set(used)
        seen.append((used, bp.sample()))
    assert seen == [(50, NORMAL), (92, NORMAL), (93, MEDIUM), (94, MEDIUM), (95, HIGH), (94, HIGH), (93, HIGH),
                    (92, MEDIUM), (91, MEDIUM), (90, NORMAL), (93, MEDIUM)]


def test_high_refuses_every_sender_and_medium_all_but_the_authoritative_ones(tmp_path):
    disk = FakeDisk(10 * GB, 50)
    bp = DiskPressure(tmp_path, usage=disk)
    assert bp.sample() == NORMAL and not bp.refuses(False) and not bp.refuses(True)
    disk.set(93.5)
    assert bp.sample() == MEDIUM and bp.refuses(False) and not bp.refuses(True)
    disk.set(99)
    assert bp.sample() == HIGH and bp.refuses(False) and bp.refuses(True)


def test_a_disabled_monitor_never_refuses(tmp_path):
    disk = FakeDisk(10 * GB, 100)
    (tmp_path / "space.reserve").write_bytes(b"x" * 4096)   # left by a run with monitoring on
    bp = DiskPressure(tmp_path, enabled=False, usage=disk)
    bp.disk_full()
    assert bp.sample() == NORMAL and bp.current() == NORMAL
    assert not (tmp_path / "space.reserve").exists()


def test_the_reserve_is_made_at_normal_and_given_up_when_the_disk_fills_or_a_write_fails(tmp_path):
    disk = FakeDisk(100 * 1024 ** 2, 10)                     # 100 MB: 2 % is 2 MB, under the 16 MB cap
    bp = DiskPressure(tmp_path, usage=disk, high_percent=80)
    bp.sample()
    reserve = tmp_path / "space.reserve"
    assert reserve.stat().st_size == (2 * 1024 ** 2) // 4096 * 4096
    disk.free = 1024 ** 2                                    # another program took all but 1 MB
    assert bp.sample() == HIGH and not reserve.exists()
    disk.set(10)
    assert bp.sample() == NORMAL and reserve.exists()
    bp.disk_full()                                           # ENOSPC from a write: High at once, reserve gone
    assert bp.level == HIGH and not reserve.exists()
    disk.set(10)
    bp.sample()
    assert reserve.exists()
    disk.free = 1024 ** 2                                    # restarted on a disk filled meanwhile: the
    assert DiskPressure(tmp_path, usage=disk).sample() == HIGH and not reserve.exists()   # old reserve goes
    (tmp_path / "big").mkdir()
    DiskPressure(tmp_path / "big", usage=FakeDisk(2000 * GB, 10)).sample()   # a large disk: the 16 MB cap
    assert (tmp_path / "big" / "space.reserve").stat().st_size == RESERVE_MAX_BYTES


def test_disk_full_errors_are_recognised_from_files_and_from_sqlite():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EIO, "I/O error"))
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count=8")
    with pytest.raises(sqlite3.Error) as full:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (zeroblob(4000))")
    assert is_disk_full(full.value)
    with pytest.raises(sqlite3.Error) as other:
        db.execute("SELECT * FROM missing")
    assert not is_disk_full(other.value)


@pytest.mark.parametrize("section, problem", [
    ({"enabled": "yes"}, "true or false"),
    ({"queue_disk_high_percent": 2}, "from 5 to 100"),
    ({"queue_disk_high_percent": 101}, "from 5 to 100"),
    ({"queue_disk_high_percent": True}, "from 5 to 100"),
    ({"queue_disk_percent": 90}, "no setting queue_disk_percent"),
])
def test_bad_settings_in_mailgate_toml_are_refused_with_the_reason(section, problem, tmp_path):
    with pytest.raises(UserError, match=problem):
        BackPressureSettings.parse(section, tmp_path / "mailgate.toml")
    assert BackPressureSettings.parse({}, tmp_path) == BackPressureSettings(enabled=True, queue_disk_high_percent=0)


def test_mailgate_toml_from_init_carries_the_setting_and_a_broken_file_is_a_clear_error(tmp_path):
    from mailgate.home import CONFIG_FILE, Home

    home = Home.create(tmp_path / "home", "EX01", "sqlite:///x.db")
    assert Home.load(home.path).back_pressure == BackPressureSettings()
    config = home.path / CONFIG_FILE
    config.write_text(config.read_text().replace("queue_disk_high_percent = 0", "queue_disk_high_percent = 85"))
    assert Home.load(home.path).back_pressure.queue_disk_high_percent == 85
    config.write_text(config.read_text() + "[[[\n")
    with pytest.raises(UserError, match="is not valid TOML"):
        Home.load(home.path)
