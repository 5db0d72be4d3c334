"""The artifact contract: names defined once, one checksum writer, one verifier, the signature
schema; and the code base keeps to it (no file-name literal elsewhere, exceptions in core/errors.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from core.errors import ChecksumError, RegistryError
from core.release import artifacts
from core.release.artifacts import (
    CHECKSUMS_FILE,
    MODEL_FILE,
    USER_VOCAB_FILE,
    VersionReader,
    make_signature,
    parse_signature,
    read_checksums,
    read_verified,
    verify_files,
    write_checksums,
)

REPO = Path(__file__).resolve().parents[3]
CODE = ["core", "tasks", "flows", "deployments", "cli.py"]


def _python_files() -> list[Path]:
    out: list[Path] = []
    for entry in CODE:
        path = REPO / entry
        out += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return out


# --------------------------------------------------------------------------- checksums


@pytest.fixture
def version(tmp_path: Path) -> Path:
    d = tmp_path / "v1"
    d.mkdir()
    (d / MODEL_FILE).write_bytes(b"\x08onnx")
    (d / artifacts.ITEM_VOCAB_FILE).write_text('["[PAD]", "a"]')
    return d


def test_one_writer_and_one_verifier_round_trip(version: Path) -> None:
    sums = write_checksums(version)
    assert json.loads((version / CHECKSUMS_FILE).read_text()) == sums
    assert set(sums) == {MODEL_FILE, artifacts.ITEM_VOCAB_FILE}  # every file but the checksums file
    assert read_checksums(version) == sums
    assert read_verified(version, MODEL_FILE, sums) == b"\x08onnx"  # the very bytes that were hashed
    verify_files(version, [MODEL_FILE, artifacts.ITEM_VOCAB_FILE, USER_VOCAB_FILE])  # absent optional: skipped


def test_the_verifier_refuses_changed_and_unlisted_files(version: Path) -> None:
    sums = write_checksums(version)
    (version / MODEL_FILE).write_bytes(b"\x08onnz")
    with pytest.raises(ChecksumError, match="checksum mismatch for v1/model.onnx"):
        read_verified(version, MODEL_FILE, sums)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        VersionReader.open(version).read(MODEL_FILE)
    (version / USER_VOCAB_FILE).write_text("[]")
    with pytest.raises(ChecksumError, match="user_ids.json is not listed in checksums.json"):
        verify_files(version, [USER_VOCAB_FILE])
    assert read_verified(version, MODEL_FILE, None) == b"\x08onnz"  # None: unverified, as asked
    with pytest.raises(RegistryError, match="cannot read"):
        read_verified(version, "absent.bin", sums)


def test_no_checksums_file_is_refused_unless_allowed(version: Path) -> None:
    with pytest.raises(ChecksumError, match="has no checksums.json.*--allow-unverified"):
        read_checksums(version)
    assert read_checksums(version, allow_unverified=True) is None
    assert VersionReader.open(version, allow_unverified=True).read(MODEL_FILE) == b"\x08onnx"
    (version / CHECKSUMS_FILE).write_text('["not", "a", "mapping"]')
    with pytest.raises(ChecksumError, match="is not a"):
        read_checksums(version)


# --------------------------------------------------------------------------- the declarative list


def test_the_file_list_is_declarative_and_consumers_derive_from_it() -> None:
    names = [a.name for a in artifacts.ARTIFACTS]
    assert len(names) == len(set(names))
    assert artifacts.SCORER_FILES == (MODEL_FILE, artifacts.SIGNATURE_FILE, artifacts.ITEM_VOCAB_FILE, USER_VOCAB_FILE,
                                      artifacts.DATA_PROFILE_FILE)  # the profile: popular items for cold starts
    assert set(artifacts.files_for(artifacts.RESCORE)) == set(artifacts.SCORER_FILES) - {artifacts.DATA_PROFILE_FILE}
    from core.serving import scorer

    assert scorer.SCORER_FILES is artifacts.SCORER_FILES


# --------------------------------------------------------------------------- signature schema


def test_signature_schema() -> None:
    seq = make_signature(artifacts.SEQUENTIAL, max_seq_length=10, n_items=41)
    assert seq == {"kind": "sequential", "inputs": ["item_seq", "item_seq_len"], "output": "scores",
                   "max_seq_length": 10, "n_items": 41, "padding_item": 0, "mask_history": False}
    user = make_signature(artifacts.USER, max_seq_length=None, n_items=41)
    assert user["inputs"] == ["user_id"] and user["max_seq_length"] is None and user["mask_history"] is True
    assert artifacts.dynamic_axes(artifacts.USER) == {"user_id": {0: "batch"}, "scores": {0: "batch"}}
    assert all(artifacts.INPUT_SHAPES[n][0] == artifacts.BATCH_AXIS for ns in artifacts.INPUTS.values() for n in ns)
    parsed = parse_signature(json.dumps(seq))
    assert parsed.sequential and parsed.max_seq_length == 10 and parsed.inputs == ("item_seq", "item_seq_len")
    # an older, sparser signature still parses (defaults for absent keys)
    old = parse_signature(b'{"kind": "user", "max_seq_length": null}')
    assert old.output == "scores" and old.inputs == ("user_id",) and old.max_seq_length == 0
    with pytest.raises(RegistryError, match="not a valid signature"):
        parse_signature(b'{"kind": "graph"}')
    with pytest.raises(ValueError):
        make_signature("graph", max_seq_length=None, n_items=3)


# --------------------------------------------------------------------------- the code keeps to it

# Every literal file name of a registered version. Spelt out here on purpose: the test must not
# trust the module it polices.
OLD_LITERALS = {
    "model.onnx", "signature.json", "item_ids.json", "user_ids.json", "model_card.json", "checksums.json",
    "ship_manifest.json", "config.yaml", "metrics.json", "best.pth",
}


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant that is not a docstring (f-string parts included)."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_file_name_literal_outside_the_contract() -> None:
    import re

    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in sorted(OLD_LITERALS)) + r")(?![\w.])")
    found = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        if rel == "core/release/artifacts.py":
            continue
        for line, text in _string_literals(ast.parse(path.read_text(), filename=rel)):
            for name in pattern.findall(text):
                found.append(f"{rel}:{line}: {name!r}")
    assert not found, "use core.release.artifacts' names instead of literals:\n" + "\n".join(found)


def test_the_literal_check_catches_a_reintroduced_literal() -> None:
    tree = ast.parse('"""model.onnx in a docstring is fine"""\nX = Path("a") / "model.onnx"\nY = f"no {z} checksums.json"')
    texts = [t for _, t in _string_literals(tree)]
    assert "model.onnx" in texts and any("checksums.json" in t for t in texts)
    assert not any("docstring" in t for t in texts)


# --------------------------------------------------------------------------- exceptions

# Private control-flow signals in modules owned elsewhere (never seen by a user).
PRIVATE_SIGNALS = {("core/modeling/training.py", "_StopTrainingError")}


def test_exception_classes_live_in_core_errors_and_end_in_error() -> None:
    import core.errors

    outside = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if (any(b.endswith(("Error", "Exception")) for b in bases) and rel != "core/errors.py"
                    and (rel, node.name) not in PRIVATE_SIGNALS):
                outside.append(f"{rel}:{node.lineno}: {node.name}")
    assert not outside, "define exceptions in core/errors.py:\n" + "\n".join(outside)
    for obj in vars(core.errors).values():
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == "core.errors":
            assert obj.__name__.endswith("Error"), obj.__name__


def test_renamed_and_moved_exceptions_keep_their_old_names() -> None:
    import core.errors as errors
    from core.modeling import champion_rescore
    from deployments import deploy

    assert errors.PipelineFailed is errors.PipelineFailedError
    assert errors.ChampionNotComparable is errors.ChampionNotComparableError
    assert champion_rescore.ChampionNotComparable is errors.ChampionNotComparableError
    assert deploy.DeploymentError is errors.DeploymentError
    exc = errors.PipelineFailed("train", "boom", "/runs/x")
    assert isinstance(exc, errors.RecflowError) and str(exc) == "train failed: boom" and exc.stage == "train"
    bad = errors.BadRequestError(422, "k must be between 1 and 10")
    assert (bad.status, bad.detail, str(bad)) == (422, "k must be between 1 and 10", "k must be between 1 and 10")
