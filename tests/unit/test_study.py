"""Study assembly: timers, hand-off once per generation, reopen, retries (real CT files)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from cad_node.config import StudyConfig
from cad_node.storage import Spool, SpoolOutcome
from cad_node.study import StudyAssembler, StudyComplete
from tests.unit.test_storage import store


def expected_fingerprint(spool: Spool, study_uid: str) -> str:
    """The documented formula, computed from the files on disk."""
    pairs = sorted(
        (inst.sop_instance_uid, hashlib.sha256(inst.path.read_bytes()).hexdigest())
        for inst in spool.index.instances_for_study(study_uid)
    )
    return hashlib.sha256("".join(f"{u}\t{h}\n" for u, h in pairs).encode()).hexdigest()


@pytest.fixture
def ct_files(lidc_dir: Path) -> list[Path]:
    files = sorted(lidc_dir.glob("*.dcm"))
    assert len(files) == 133
    return files


def test_hand_off_once_duplicates_silent_new_instance_reopens(
    tmp_path: Path, ct_files: list[Path]
) -> None:
    events: list[StudyComplete] = []
    cfg = StudyConfig(series_quiet_s=5, study_quiet_s=10, force_complete_s=600)
    with Spool.open(tmp_path) as spool:
        asm = StudyAssembler(spool.index, cfg, events.append)
        for f in ct_files[:-1]:
            store(spool, f)
        study_uid = dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
        last = spool.index.study(study_uid).last_received  # type: ignore[union-attr]
        assert asm.poll(last + 9.9) == [] and events == []
        first = asm.poll(last + 10.0)
        assert len(first) == 1 and events == first
        ev = first[0]
        assert ev.study_instance_uid == study_uid and ev.generation == 1
        assert len(ev.instances) == 132
        assert {i.sop_instance_uid for i in ev.instances} == {
            dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct_files[:-1]
        }
        assert ev.fingerprint == expected_fingerprint(spool, study_uid)
        assert asm.poll(last + 100) == []  # exactly once

        # the same study sent again: all duplicates, no new generation
        assert all(store(spool, f).status is SpoolOutcome.DUPLICATE for f in ct_files[:-1])
        assert asm.poll(time.time() + 1000) == []

        # one new instance after the hand-off reopens the study
        assert store(spool, ct_files[-1]).status is SpoolOutcome.STORED
        state = spool.index.study(study_uid)
        assert state is not None and state.pending
        assert asm.poll(state.last_received + 1) == []
        second = asm.poll(state.last_received + 10)
        assert len(second) == 1
        assert second[0].generation == 2 and len(second[0].instances) == 133
        assert second[0].fingerprint != ev.fingerprint
        assert second[0].fingerprint == expected_fingerprint(spool, study_uid)
        assert events == [ev, second[0]]
        assert asm.poll(time.time() + 10_000) == []


def test_series_quiet_and_forced_completion(tmp_path: Path, ct_files: list[Path]) -> None:
    events: list[StudyComplete] = []
    # series timer longer than the study timer: the series timer decides
    cfg = StudyConfig(series_quiet_s=50, study_quiet_s=10, force_complete_s=80)
    with Spool.open(tmp_path) as spool:
        asm = StudyAssembler(spool.index, cfg, events.append)
        for f in ct_files[:3]:
            store(spool, f)
        study = spool.index.studies()[0]
        assert asm.poll(study.last_received + 20) == []
        assert len(asm.poll(study.last_received + 50)) == 1
    events.clear()
    cfg = StudyConfig(series_quiet_s=1000, study_quiet_s=10, force_complete_s=60)
    with Spool.open(tmp_path / "b") as spool:
        asm = StudyAssembler(spool.index, cfg, events.append)
        store(spool, ct_files[0])
        study = spool.index.studies()[0]
        assert asm.poll(study.opened_at + 59) == []
        forced = asm.poll(study.opened_at + 60)
        assert len(forced) == 1 and len(forced[0].instances) == 1


def test_failed_hand_off_is_retried_at_next_poll(tmp_path: Path, ct_files: list[Path]) -> None:
    calls: list[StudyComplete] = []

    def flaky(ev: StudyComplete) -> None:
        calls.append(ev)
        if len(calls) == 1:
            raise RuntimeError("broker down")

    cfg = StudyConfig(series_quiet_s=1, study_quiet_s=1, force_complete_s=600)
    with Spool.open(tmp_path) as spool:
        asm = StudyAssembler(spool.index, cfg, flaky)
        for f in ct_files[:2]:
            store(spool, f)
        now = time.time() + 5
        assert asm.poll(now) == []  # raised: not marked handed on
        assert spool.index.studies()[0].pending
        retried = asm.poll(now + 1)
        assert len(retried) == 1 and len(calls) == 2
        assert calls[0] == calls[1]  # same generation and fingerprint offered again
        assert not spool.index.studies()[0].pending
        assert asm.poll(now + 100) == []


def test_background_thread_hands_off(tmp_path: Path, ct_files: list[Path]) -> None:
    events: list[StudyComplete] = []
    cfg = StudyConfig(series_quiet_s=0.2, study_quiet_s=0.3, force_complete_s=60,
                      poll_interval_s=0.05)
    with Spool.open(tmp_path) as spool:
        asm = StudyAssembler(spool.index, cfg, events.append)
        asm.start()
        try:
            for f in ct_files[:5]:
                store(spool, f)
            deadline = time.monotonic() + 10
            while not events and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            asm.stop()
        assert len(events) == 1 and len(events[0].instances) == 5


def test_own_results_echoed_back_do_not_reopen(tmp_path: Path, ct_files: list[Path]) -> None:
    events: list[StudyComplete] = []
    cfg = StudyConfig(series_quiet_s=1, study_quiet_s=1, force_complete_s=600)
    # a result object of ours as a PACS would route it back: same study, new
    # series and instance, Manufacturer = results.manufacturer
    ds = dcmread(ct_files[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.511.9.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.9.2"
    ds.Manufacturer = "cad-node"
    echoed = tmp_path / "echoed.dcm"
    ds.save_as(echoed, enforce_file_format=True)
    with Spool.open(tmp_path / "s", own_manufacturers=frozenset({"cad-node"})) as spool:
        asm = StudyAssembler(spool.index, cfg, events.append)
        for f in ct_files[:3]:
            store(spool, f)
        assert len(asm.poll(time.time() + 5)) == 1
        assert store(spool, echoed).status is SpoolOutcome.STORED
        study = spool.index.studies()[0]
        assert not study.pending and study.num_instances == 4
        assert asm.poll(time.time() + 50) == []
        # a real new instance reopens it; the echoed result is listed too
        store(spool, ct_files[3])
        second = asm.poll(time.time() + 100)
        assert len(second) == 1 and second[0].generation == 2
        assert len(second[0].instances) == 5
        assert ds.SOPInstanceUID in {i.sop_instance_uid for i in second[0].instances}
