"""cad-node: a PACS-integrated computer-aided detection node.

Architecture, layer by layer (after pynetdicom's and highdicom's layouts):

- :mod:`cad_node.config`: one typed configuration.
- :mod:`cad_node.scp`: the DICOM network edge (association admission, C-ECHO, C-STORE).
- :mod:`cad_node.storage`: the durable spool and its index.
- :mod:`cad_node.study`: study assembly and the "study complete" hand-off.
- :mod:`cad_node.imaging`: series selection and series-to-volume geometry.
- :mod:`cad_node.pipelines`: registered analysis pipelines (``ct-chest``...).
- :mod:`cad_node.models`: model bundles and networks.
- :mod:`cad_node.results`: result IODs (``sr``, ``seg``, ``sc``...) and the conformance gate.
- :mod:`cad_node.jobs`: Celery app, job table, routing.
- :mod:`cad_node.export`: outbound C-STORE with durable retries.
- :mod:`cad_node.cli`: the ``cad-node`` command line.
"""

__version__ = "0.1.0"
