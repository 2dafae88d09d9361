"""Study assembly and the "study complete" hand-off.

Public API: :class:`StoredInstance`, :class:`StudyComplete`,
:class:`StudyAssembler` and :func:`study_fingerprint`.

The hand-off in one paragraph: :class:`cad_node.scp.NodeServer` runs a
:class:`StudyAssembler` that calls ``on_study_complete(StudyComplete)`` once
per *generation* of a study, when the completeness timers of
:class:`cad_node.config.StudyConfig` say so.  The event lists every stored
instance of the study (absolute paths of immutable Part-10 files in the
spool).  The study is marked handed-on only after the callback returns; if it
raises, it is offered again at the next poll, so delivery is at-least-once
(also across crashes): de-duplicate on ``(study_instance_uid, fingerprint)``.
New instances after a hand-off reopen the study and a later generation, with a
new fingerprint, supersedes the earlier one.  Another process reads the same
index with :meth:`cad_node.storage.Spool.open_index_readonly`
(``instances_for_study(study_uid)``, ``study(study_uid)``...).
"""

from cad_node.storage.records import StoredInstance, StudyComplete
from cad_node.study.assembler import StudyAssembler, study_fingerprint

__all__ = ["StoredInstance", "StudyAssembler", "StudyComplete", "study_fingerprint"]
