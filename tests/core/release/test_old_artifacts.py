"""Old artifacts keep working: a version registered by the code before the artifact contract
(``tests/fixtures/registry_v0``, made by ``tests/fixtures/make_registry_v0.py``) still verifies,
loads, serves, ships, gets re-scored as champion, and its checkpoint still loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from recflow_testdata import TinyRun

from core.errors import ChecksumError
from core.release import artifacts
from core.release.registry import Registry, verify_checksums
from core.serving.app import create_app, load_version
from core.serving.scorer import OnnxScorer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "registry_v0"
NAME, VERSION = "tiny-sasrec", "v0"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A private copy of the fixture (tests may tamper with it); the champion link recreated if git lost it."""
    root = tmp_path / "registry"
    shutil.copytree(FIXTURE, root, symlinks=True)
    link = root / NAME / artifacts.CHAMPION_LINK
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        os.symlink(VERSION, link)
    return Registry(root)


def _version_dir(registry: Registry) -> Path:
    return registry.entry(NAME) / VERSION


def test_the_fixture_is_what_the_contract_describes(registry: Registry) -> None:
    version_dir = _version_dir(registry)
    present = {p.name for p in version_dir.iterdir()}
    required = {a.name for a in artifacts.ARTIFACTS if a.required}
    assert required <= present
    assert present <= set(artifacts.BY_NAME)  # nothing the contract does not know
    assert registry.champion_version(NAME) == VERSION
    assert registry.card(NAME, VERSION)["version"] == VERSION


def test_its_checksums_verify_with_the_one_verifier(registry: Registry) -> None:
    version_dir = _version_dir(registry)
    every = sorted(p.name for p in version_dir.iterdir() if p.name != artifacts.CHECKSUMS_FILE)
    verify_checksums(version_dir, every)
    artifacts.verify_files(version_dir, every)
    expected = artifacts.read_checksums(version_dir)
    assert expected == artifacts.compute_checksums(version_dir)  # the writer would write the same today
    for name in every:
        assert artifacts.read_verified(version_dir, name, expected) == (version_dir / name).read_bytes()
    (version_dir / artifacts.ITEM_VOCAB_FILE).write_bytes((version_dir / artifacts.ITEM_VOCAB_FILE).read_bytes() + b" ")
    with pytest.raises(ChecksumError, match=f"checksum mismatch for v0/{artifacts.ITEM_VOCAB_FILE}"):
        verify_checksums(version_dir, every)


def test_its_signature_parses(registry: Registry) -> None:
    sig = artifacts.VersionReader.open(_version_dir(registry)).signature()
    assert sig.sequential and sig.inputs == artifacts.INPUTS[artifacts.SEQUENTIAL]
    assert sig.output == artifacts.SCORES_OUTPUT and sig.max_seq_length == 10


def test_it_loads_in_the_scorer_and_answers_through_the_serving_app(registry: Registry) -> None:
    version_dir = _version_dir(registry)
    scorer = OnnxScorer(version_dir, checksums=artifacts.read_checksums(version_dir))
    assert scorer.sequential and scorer.n_items == 40
    want = scorer.recommend(["i3", "i4", "i5"], k=5)
    assert len(want) == 5
    loaded = load_version(registry, NAME, VERSION)
    assert loaded.scorer.max_seq_length == 10
    with TestClient(create_app(registry.root, NAME, poll_seconds=0)) as client:
        resp = client.post("/recommendations", json={"items": ["i3", "i4", "i5"], "k": 5})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert (body["model"], body["version"]) == (NAME, VERSION)
        assert [r["item"] for r in body["items"]] == [r.item for r in want]
        assert client.get("/healthz").json()["status"] == "ok"


def test_a_tampered_old_version_is_refused_by_serving(registry: Registry) -> None:
    version_dir = _version_dir(registry)
    (version_dir / artifacts.MODEL_FILE).write_bytes((version_dir / artifacts.MODEL_FILE).read_bytes()[:-1] + b"\0")
    with pytest.raises(ChecksumError, match=f"v0/{artifacts.MODEL_FILE}"):
        load_version(registry, NAME, VERSION)


def test_it_would_ship_and_a_changed_file_would_not(registry: Registry) -> None:
    from core.errors import ShippingError
    from core.release.shipping.sftp import _local_files

    version_dir = _version_dir(registry)
    names = [rel for rel, *_ in _local_files(version_dir)]
    assert artifacts.MODEL_FILE in names and artifacts.CHECKSUMS_FILE in names
    card = version_dir / artifacts.CARD_FILE
    card.write_text(json.dumps({**json.loads(card.read_text()), "edited": True}))
    with pytest.raises(ShippingError, match=f"{artifacts.CARD_FILE} changed since registration"):
        _local_files(version_dir)


def test_it_is_re_scored_as_champion_on_tonights_data(registry: Registry, tiny_run: TinyRun, tmp_path: Path) -> None:
    from core.modeling.champion_rescore import ChampionNotComparableError, rescore_champion
    from core.modeling.dataset import load_recbole_data

    data = load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)
    metrics = rescore_champion(data, _version_dir(registry), tmp_path / "champion.pth")
    assert metrics["ndcg@10"] > 0.0  # a real ranking, not an all-unranked comparison
    # re-scoring verifies what it loads: a changed graph makes the champion not comparable
    onnx = _version_dir(registry) / artifacts.MODEL_FILE
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ChampionNotComparableError, match="checksum mismatch"):
        rescore_champion(data, _version_dir(registry), tmp_path / "champion2.pth")


def test_its_checkpoint_still_loads(registry: Registry, tiny_run: TinyRun) -> None:
    from core.modeling.dataset import load_recbole_data
    from core.modeling.training import load_trained

    data = load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)
    model = load_trained(data, _version_dir(registry) / artifacts.CHECKPOINT_FILE)
    assert sum(p.numel() for p in model.parameters()) > 0
