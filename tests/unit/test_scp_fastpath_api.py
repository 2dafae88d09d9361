"""The private pynetdicom API the SCP's fast path overrides has not changed shape.

If this fails after a pynetdicom upgrade, re-read every override in
``cad_node/scp/_fastpath.py`` against the new release before moving the pin
in pyproject.toml: the node's memory and slot guarantees depend on them.
"""

from __future__ import annotations

import pynetdicom
import pytest
from pynetdicom import _config

from cad_node.scp import _fastpath


def test_pynetdicom_is_the_release_series_the_overrides_were_written_for() -> None:
    assert str(pynetdicom.__version__).startswith(_fastpath.PYNETDICOM_SERIES), (
        f"pynetdicom {pynetdicom.__version__} installed; cad_node/scp/_fastpath.py was "
        f"written against {_fastpath.PYNETDICOM_SERIES}x"
    )


def test_private_api_has_the_expected_shape() -> None:
    assert _fastpath.private_api_mismatches() == []
    _fastpath.require_compatible()


@pytest.mark.invalid_values  # feeds pynetdicom's UI validator an over-long UID on purpose
def test_ui_validator_is_looked_up_at_call_time_and_scoped() -> None:
    original = _config.VALIDATORS["UI"]
    assert original("1.2.3")[0] and not original("1." + "2" * 70)[0]
    with _fastpath.lenient_uid_validation():
        # this (test) thread is not a node association thread: strict as before
        assert not _config.VALIDATORS["UI"]("1." + "2" * 70)[0]
        with _fastpath.lenient_uid_validation():
            pass
        assert _config.VALIDATORS["UI"] is not original
    assert _config.VALIDATORS["UI"] is original
