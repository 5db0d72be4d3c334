"""The local registry: versions assembled atomically, the champion symlink switched atomically."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from core.errors import ChecksumError, RegistryError
from core.release.registry import CARD_FILE, CHAMPION, CHECKSUMS_FILE, Registry, sha256_file, verify_checksums

NAME = "tiny-sasrec"


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = []
    for name, content in [("model.onnx", b"\x08onnx-bytes"), ("metrics.json", b'{"ndcg@10": 0.3}'),
                          ("config.yaml", b"training:\n  epochs: 2\n")]:
        (src / name).write_bytes(content)
        out.append(src / name)
    return out


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def _entries(registry: Registry) -> list[str]:
    return sorted(p.name for p in registry.entry(NAME).iterdir())


def test_empty_registry(registry: Registry) -> None:
    assert registry.versions(NAME) == []
    assert registry.champion_version(NAME) is None
    assert registry.champion_card(NAME) is None


def test_new_version_format() -> None:
    a, b = Registry.new_version(), Registry.new_version()
    assert re.fullmatch(r"v\d{8}-\d{6}-[0-9a-f]{4}", a)
    assert a != b


def test_publish_without_promote_leaves_champion_unchanged(registry: Registry, files: list[Path]) -> None:
    first = registry.publish(NAME, "v1", files, {"model": "SASRec"}, promote=True)
    assert first.champion == "v1"
    second = registry.publish(NAME, "v2", files, {"model": "SASRec"}, promote=False)
    assert second.promoted is False
    assert second.champion == "v1"
    assert registry.champion_version(NAME) == "v1"
    assert registry.versions(NAME) == ["v1", "v2"]
    assert (registry.entry(NAME) / "v2" / "model.onnx").read_bytes() == b"\x08onnx-bytes"


def test_first_publish_without_promote_has_no_champion(registry: Registry, files: list[Path]) -> None:
    promo = registry.publish(NAME, "v1", files, {}, promote=False)
    assert promo.champion is None
    assert not (registry.entry(NAME) / CHAMPION).is_symlink()
    assert registry.champion_version(NAME) is None


def test_promote_switches_the_symlink(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {"n": 1}, promote=True)
    link = registry.entry(NAME) / CHAMPION
    assert link.is_symlink() and os.readlink(link) == "v1"  # relative: the registry can move
    promo = registry.publish(NAME, "v2", files, {"n": 2}, promote=True)
    assert os.readlink(link) == "v2"
    assert promo.promoted is True and promo.champion == "v2"
    assert promo.version_dir == (registry.entry(NAME) / "v2").resolve()
    assert promo.registry == registry.root.resolve()
    assert registry.champion_card(NAME)["n"] == 2
    # no temp links or staging folders left behind
    assert _entries(registry) == sorted([CHAMPION, "v1", "v2"])


def test_champion_points_at_a_complete_version(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {"model": "SASRec", "metrics": {"test": {"ndcg@10": 0.3}}}, promote=True)
    champion_dir = registry.entry(NAME) / CHAMPION
    assert sorted(p.name for p in champion_dir.iterdir()) == sorted([f.name for f in files] + [CARD_FILE, CHECKSUMS_FILE])
    for f in files:
        assert (champion_dir / f.name).read_bytes() == f.read_bytes()
    card = json.loads((champion_dir / CARD_FILE).read_text())
    assert card["version"] == "v1"
    assert card["metrics"] == {"test": {"ndcg@10": 0.3}}
    assert "registered_at" in card
    assert registry.champion_card(NAME) == card
    assert registry.card(NAME, "v1") == card


def test_failed_publish_leaves_no_version_and_champion_unchanged(
    registry: Registry, files: list[Path], tmp_path: Path
) -> None:
    registry.publish(NAME, "v1", files, {}, promote=True)
    missing = tmp_path / "src" / "best.pth"
    with pytest.raises(OSError):
        registry.publish(NAME, "v2", [*files, missing], {}, promote=True)
    assert not (registry.entry(NAME) / "v2").exists()
    assert _entries(registry) == sorted([CHAMPION, "v1"])  # staging folder cleaned up
    assert registry.versions(NAME) == ["v1"]
    assert registry.champion_version(NAME) == "v1"
    # and the version name is still free for a retry
    assert registry.publish(NAME, "v2", files, {}, promote=True).champion == "v2"


def test_failed_first_publish_creates_no_champion(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        registry.publish(NAME, "v1", [tmp_path / "missing.onnx"], {}, promote=True)
    assert registry.versions(NAME) == []
    assert registry.champion_version(NAME) is None


def test_existing_version_is_refused(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {"n": 1}, promote=True)
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish(NAME, "v1", files, {"n": 2}, promote=True)
    assert registry.card(NAME, "v1")["n"] == 1


def test_broken_champion_pointers_are_reported(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {}, promote=False)
    link = registry.entry(NAME) / CHAMPION
    os.symlink("v-gone", link)
    with pytest.raises(RegistryError, match="missing version 'v-gone'"):
        registry.champion_version(NAME)
    link.unlink()
    link.write_text("v1")
    with pytest.raises(RegistryError, match="not a symlink"):
        registry.champion_version(NAME)


def test_unreadable_card(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {}, promote=True)
    (registry.entry(NAME) / "v1" / CARD_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read model card"):
        registry.champion_card(NAME)


def test_publish_writes_checksums_that_verify(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {"n": 1}, promote=True)
    version_dir = registry.entry(NAME) / "v1"
    sums = json.loads((version_dir / CHECKSUMS_FILE).read_text())
    assert sorted(sums) == sorted([f.name for f in files] + [CARD_FILE])  # every file but itself
    assert sums["model.onnx"] == sha256_file(files[0])
    assert len(sums["model.onnx"]) == 64
    verify_checksums(version_dir, ["model.onnx", "metrics.json", "absent.json"])
    (version_dir / "model.onnx").write_bytes(b"\x08onnx-bytez")  # same size, one byte differs
    with pytest.raises(ChecksumError, match="checksum mismatch for v1/model.onnx"):
        verify_checksums(version_dir, ["model.onnx"])
    verify_checksums(version_dir, ["metrics.json"])  # only the named files are checked


def test_version_without_checksums_is_refused_unless_allowed(registry: Registry, files: list[Path]) -> None:
    registry.publish(NAME, "v1", files, {}, promote=True)
    version_dir = registry.entry(NAME) / "v1"
    (version_dir / CHECKSUMS_FILE).unlink()
    with pytest.raises(ChecksumError, match="has no checksums.json.*--allow-unverified"):
        verify_checksums(version_dir, ["model.onnx"])
    verify_checksums(version_dir, ["model.onnx"], allow_unverified=True)
