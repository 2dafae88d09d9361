"""Key Object Selection Document (PS3.3 A.35.4) flagging the CAD key images.

Document title (CID 7010) "Of Interest" (DCM 113000); the observer is the
algorithm (device observer context, Device Observer UID = model Device UID).
It references, in finding order and without repeats, the source image each
finding's key image shows (:func:`cad_node.results.sc.key_slice_uid`), so a
viewer can jump to the findings on the original images.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from cad_node.results._common import (
    BuildContext,
    SeriesNumber,
    processing_equipment,
    series_description,
)
from cad_node.results.sc import key_slice_uid

__all__ = ["KOS_TITLE", "build_kos"]

#: CID 7010 Key Object Selection Document Title.
KOS_TITLE = codes.DCM.OfInterest


def build_kos(ctx: BuildContext) -> hd.ko.KeyObjectSelectionDocument:
    """Build the KOS referencing each finding's key source image.

    Raises
    ------
    ValueError
        The result has no findings.
    """
    if not ctx.result.findings:
        raise ValueError("a KOS needs at least one finding")
    uids: list[str] = []
    for finding in ctx.result.findings:
        uid = key_slice_uid(ctx, finding)
        if uid not in ctx.source.by_uid:
            raise ValueError(f"key image {uid} of {finding.tracking_id!r} was not received")
        if uid not in uids:
            uids.append(uid)
    images = [ctx.source.by_uid[u] for u in uids]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ctx.model.device_uid, name=ctx.model.name, manufacturer_name=ctx.model.manufacturer
    )
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLE,
        referenced_objects=images,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
        description=f"CAD findings ({ctx.model.name} {ctx.model.version})"[:1024],
    )
    kwargs = ctx.common_kwargs()
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=images,
        content=content,
        series_instance_uid=ctx.uids.uid("kos.series"),
        series_number=ctx.series_number(SeriesNumber.KOS),
        sop_instance_uid=ctx.uids.uid("kos.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        institution_name=ctx.settings.institution_name,
        contributing_equipment=[processing_equipment(ctx.model, ctx.when)],
        series_description=series_description("key objects", ctx.model),
        **{k: v for k, v in kwargs.items() if k != "institution_name"},
    )
    ctx.finalize(kos, "kos")
    return kos
