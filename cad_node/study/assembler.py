"""Study assembly: decide when a study is complete and hand it on.

Completeness rules (all times from :class:`cad_node.config.StudyConfig`)
-----------------------------------------------------------------------
A study that has instances not handed on yet (*pending*) is complete when

* no new instance arrived in the study for ``study_quiet_s`` **and** no new
  instance arrived in any of its series for ``series_quiet_s``; or
* ``force_complete_s`` passed since the first instance of the current
  generation arrived (a sender that trickles instances forever still gets
  processed).

Times are the wall-clock ``received_at`` values stored in the index, so timers
survive a restart.  A study may arrive over any number of associations.

Hand-off contract
-----------------
``on_complete(StudyComplete)`` is called once per generation, from the thread
calling :meth:`StudyAssembler.poll`.  The study is marked handed-on in the
index only after ``on_complete`` returns without raising; if it raises, the
error is logged and the same generation is offered again at the next poll.
Across crashes delivery is therefore *at-least-once*: consumers de-duplicate on
``(study_instance_uid, fingerprint)``.

* A study re-sent unchanged (only duplicates) creates no new generation:
  duplicates are not indexed, so the study never becomes pending again.
* The node's own result objects, echoed back by a PACS (Manufacturer equal
  to ``results.manufacturer``), are listed in later hand-offs but never
  reopen a study on their own (no analysis feedback loop).
* A new instance after a hand-off reopens the study; when it completes again
  it is handed on as ``generation + 1`` with all its instances and a new
  fingerprint.  The later generation supersedes the earlier one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from cad_node.config import StudyConfig
from cad_node.storage.index import SpoolIndex, StudyState
from cad_node.storage.records import StudyComplete

__all__ = ["StudyAssembler", "study_fingerprint"]

log = logging.getLogger(__name__)


def study_fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """Fingerprint of a study's content.

    Parameters
    ----------
    pairs : iterable of (str, str)
        ``(SOP Instance UID, hex SHA-256 of the stored file)`` per instance.

    Returns
    -------
    str
        Hex SHA-256 over the pairs sorted by SOP Instance UID, each encoded
        as ``"<sop uid>\\t<file sha256>\\n"`` in ASCII.
    """
    digest = hashlib.sha256()
    for sop_uid, file_sha in sorted(pairs):
        digest.update(f"{sop_uid}\t{file_sha}\n".encode("ascii"))
    return digest.hexdigest()


class StudyAssembler:
    """Apply the completeness timers to the spool index and hand studies on.

    Parameters
    ----------
    index : SpoolIndex
        The writable index of the spool (the SCP process's).
    settings : StudyConfig
        Timers.
    on_complete : callable
        Receives one :class:`StudyComplete` per generation (see the module
        docstring for the contract).  Must be idempotent on
        ``(study_instance_uid, fingerprint)``.
    """

    def __init__(
        self,
        index: SpoolIndex,
        settings: StudyConfig,
        on_complete: Callable[[StudyComplete], None],
    ) -> None:
        self.index = index
        self.settings = settings
        self.on_complete = on_complete
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _is_complete(self, study: StudyState, now: float) -> str | None:
        """Return why ``study`` is complete at ``now`` ("quiet"/"forced"), or None."""
        if now - study.opened_at >= self.settings.force_complete_s:
            return "forced"
        if now - study.last_received < self.settings.study_quiet_s:
            return None
        for series in self.index.series_for_study(study.study_id):
            if now - series.last_received < self.settings.series_quiet_s:
                return None
        return "quiet"

    def poll(self, now: float | None = None) -> list[StudyComplete]:
        """Hand on every pending study that is complete at ``now``.

        Parameters
        ----------
        now : float, optional
            Wall-clock time (``time.time()`` when omitted); tests pass it to
            drive the timers deterministically.

        Returns
        -------
        list of StudyComplete
            The events whose ``on_complete`` call succeeded during this poll.
        """
        now = time.time() if now is None else now
        handed: list[StudyComplete] = []
        with self._poll_lock:
            for study in self.index.studies(pending_only=True):
                reason = self._is_complete(study, now)
                if reason is None:
                    continue
                rows = self.index.instance_hashes(study.study_id)
                fingerprint = study_fingerprint(
                    (inst.sop_instance_uid, sha) for inst, sha, _ in rows
                )
                # The index never deletes instances and its revision counts the
                # new ones except the node's own echoed results, so that count
                # is the snapshot's revision.
                revision = sum(1 for *_, own in rows if not own)
                if fingerprint == study.handed_fingerprint:
                    self.index.mark_handed(
                        study.study_id, study.generation, fingerprint, revision, now
                    )
                    continue
                event = StudyComplete(
                    study_id=study.study_id,
                    study_instance_uid=study.study_instance_uid,
                    generation=study.generation + 1,
                    instances=tuple(inst for inst, *_ in rows),
                    fingerprint=fingerprint,
                )
                try:
                    self.on_complete(event)
                except Exception:
                    log.exception(
                        "study=%s generation=%d: hand-off failed; retrying at the next poll",
                        study.study_instance_uid, event.generation,
                    )
                    continue
                self.index.mark_handed(
                    study.study_id, event.generation, fingerprint, revision, now
                )
                log.info(
                    "study=%s generation=%d complete (%s): %d instance(s), fingerprint %s",
                    study.study_instance_uid, event.generation, reason, revision,
                    fingerprint[:16],
                )
                handed.append(event)
        return handed

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.poll()
            except Exception:
                log.exception("study assembler poll failed; continuing")

    def start(self) -> None:
        """Call :meth:`poll` every ``poll_interval_s`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (waits for a running poll to finish)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
