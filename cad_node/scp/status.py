"""DIMSE statuses the SCP answers with: :class:`cad_node.dimse.Status`.

The status table is :mod:`cad_node.dimse`, shared with the SCU
(:mod:`cad_node.export`); this module keeps the name the SCP has always
imported (``from cad_node.scp.status import Status``).
"""

from __future__ import annotations

from cad_node.dimse import Status, StatusCategory, code_to_category

__all__ = ["Status", "StatusCategory", "code_to_category"]
