"""Study assembly and the "study complete" hand-off.

Public API: :class:`StoredInstance`, :class:`StudyComplete`,
:class:`StudyAssembler` and :func:`study_fingerprint`.
"""

from cad_node.storage.records import StoredInstance, StudyComplete
from cad_node.study.assembler import StudyAssembler, study_fingerprint

__all__ = ["StoredInstance", "StudyAssembler", "StudyComplete", "study_fingerprint"]
