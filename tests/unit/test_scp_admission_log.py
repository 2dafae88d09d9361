"""RefusalLog: one line per refused source address per interval, counts kept, bounded."""

from __future__ import annotations

import logging

import pytest

from cad_node.scp.admission import RefusalLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cad_node.scp.admission"]


def test_a_flood_from_one_address_is_one_line_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RefusalLog(interval_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="cad_node.scp.admission"):
        logged = [rl.refused("10.0.0.9") for _ in range(500)]
        assert logged.count(True) == 1
        clock.t += 59.0
        assert rl.refused("10.0.0.9") is False
        clock.t += 1.0  # 60 s after the first line
        assert rl.refused("10.0.0.9") is True
        assert rl.refused("10.0.0.7") is True  # another address has its own line
    lines = _lines(caplog)
    assert lines == [
        "connection from 10.0.0.9 refused at accept",
        "connection from 10.0.0.9 refused at accept (and 500 more since the last such line,"
        " 60 s ago)",
        "connection from 10.0.0.7 refused at accept",
    ]


def test_the_table_is_bounded_and_forgets_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RefusalLog(interval_s=60.0, max_addresses=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="cad_node.scp.admission"):
        for a in ("a", "b", "c", "d"):  # "a" is forgotten when "d" arrives
            assert rl.refused(a) is True
        assert rl.refused("d") is False
        assert rl.refused("a") is True  # forgotten, so logged again at once
    assert len(rl._seen) == 3


@pytest.mark.parametrize("kwargs", [{"interval_s": 0.0}, {"max_addresses": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RefusalLog(**kwargs)  # type: ignore[arg-type]
