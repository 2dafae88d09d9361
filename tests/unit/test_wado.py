"""The receiver's study fetch endpoint on a real socket: read-only, token, study scope."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cad_node.storage.index import NewInstance, SpoolIndex
from cad_node.storage.wado import (
    FetchError,
    StudyTokens,
    WadoServer,
    create_app,
    fetch_study,
    load_or_create_key,
)
from tests.conftest import free_port

STUDY_A = "1.2.826.0.1.3680043.8.498.101"
STUDY_B = "1.2.826.0.1.3680043.8.498.102"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("wado")
    objects = root / "objects"
    (objects / "000000").mkdir(parents=True)
    index = SpoolIndex(root / "index.sqlite3", objects)
    records = []
    for i, study in ((1, STUDY_A), (2, STUDY_A), (3, STUDY_B)):
        rel = f"000000/{i:010d}.dcm"
        (objects / rel).write_bytes(b"DICM-bytes-of-instance-%d" % i)
        index.add_instance(NewInstance(i, f"{study}.1.{i}", "1.2.840.10008.5.1.4.1.1.2", study,
                                       f"{study}.1", "1.2.840.10008.1.2.1", "P", None, "CT",
                                       rel, 24, "", time.time()))
        records.append({"study_instance_uid": study, "series_instance_uid": f"{study}.1",
                        "sop_instance_uid": f"{study}.1.{i}"})
    key_file = root / "wado.key"
    tokens = StudyTokens(load_or_create_key(key_file))
    assert key_file.stat().st_mode & 0o777 == 0o600
    server = WadoServer(create_app(index, tokens), "127.0.0.1", free_port())
    server.start()
    yield server, tokens, records, root
    server.stop()
    index.close()


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_fetch_with_the_study_token(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, tokens, records, _ = served
    base = f"http://127.0.0.1:{server.port}"
    paths = fetch_study(base, tokens.mint(STUDY_A), records[:2], tmp_path / "job")
    assert [p.name for p in paths] == ["000000.dcm", "000001.dcm"]
    assert paths[1].read_bytes() == b"DICM-bytes-of-instance-2"


def test_refusals(served) -> None:  # type: ignore[no-untyped-def]
    server, tokens, records, _ = served
    base = f"http://127.0.0.1:{server.port}"
    a1 = records[0]
    url = (f"{base}/studies/{a1['study_instance_uid']}/series/{a1['series_instance_uid']}"
           f"/instances/{a1['sop_instance_uid']}")
    assert _get(url, tokens.mint(STUDY_A)) == 200
    assert _get(url, None) == 401
    assert _get(url, tokens.mint(STUDY_B)) == 403          # another study's token
    assert _get(url, StudyTokens(b"k" * 32).mint(STUDY_A)) == 403  # another key
    b = records[2]                                          # B's instance under A's URL
    assert _get(f"{base}/studies/{STUDY_A}/series/{STUDY_A}.1/instances/"
                f"{b['sop_instance_uid']}", tokens.mint(STUDY_A)) == 404
    assert _get(f"{base}/studies/../series/x/instances/y", tokens.mint(STUDY_A)) in (400, 404)
    req = urllib.request.Request(url, method="DELETE",
                                 headers={"Authorization": f"Bearer {tokens.mint(STUDY_A)}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405                            # read-only
    with pytest.raises(FetchError, match="403"):
        fetch_study(base, tokens.mint(STUDY_B), records[:1], Path(served[3]) / "x")
