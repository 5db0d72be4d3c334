"""The artifact contract: what a registered version holds, and how its bytes are vouched for.

Every file name of a registered version is defined here and nowhere else; every checksum is
written by ``write_checksums`` and verified by ``verify_bytes`` (which ``read_verified``,
``verify_files`` and ``verify_digest`` go through). The ONNX signature schema (input and
output names, dtypes, shapes) that export writes and the scorers read is defined here too.

A version directory (``<registry>/<model>/<version>/``)::

    model.onnx          ONNX graph (absent for models not exported, e.g. UserKNN or a rating model over
                        more fields than user and item; the card says why)
    signature.json      the graph's inputs/outputs (``make_signature``)
    item_ids.json       internal item id -> token (index 0: padding)
    user_ids.json       internal user id -> token
    model_card.json     the card
    metrics.json        evaluation metrics
    config.yaml         the run's resolved config
    best.pth            the trained checkpoint
    data_profile.json   item popularity and history lengths of the training snapshot (optional)
    checksums.json      {file name: sha256} of every other file, written last inside staging
    ship_manifest.json  only in copies on the production host (written by shipping)

Extending it (a later version adds scorer files or a data profile): add an ``ArtifactFile`` to
``ARTIFACTS`` with ``required=False`` and the consumers that read it. Nothing else changes: the
writer hashes every file in the directory, the verifier checks whatever a consumer loads, and
versions made before the file existed keep loading (an optional file may be absent).

Verification reads a file's bytes once, hashes those bytes and hands the same bytes to the
caller (onnxruntime, json, torch): a file swapped between a check and the load cannot slip
through. No Prefect, torch or onnxruntime import here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ChecksumError, RegistryError

# --------------------------------------------------------------------------------------------
# File names (the only place they are spelt out)

MODEL_FILE = "model.onnx"
SIGNATURE_FILE = "signature.json"
ITEM_VOCAB_FILE = "item_ids.json"
USER_VOCAB_FILE = "user_ids.json"
CARD_FILE = "model_card.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "best.pth"
CHECKSUMS_FILE = "checksums.json"
SHIP_MANIFEST_FILE = "ship_manifest.json"
DATA_PROFILE_FILE = "data_profile.json"  # item popularity + history lengths of the training snapshot
CHAMPION_LINK = "champion"  # <registry>/<model>/champion -> <version>

# Consumers: who loads a file (and so verifies it before use).
SERVING = "serving"  # core/serving/scorer.py (the app, `recflow recommend`)
RESCORE = "rescore"  # core/modeling/champion_rescore.py
ONLINE = "online"  # core/online/drift.py (recflow ab-report)


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a registered version."""

    name: str
    description: str
    required: bool = False  # every registered version has it
    consumers: frozenset[str] = field(default_factory=frozenset)  # who loads it from a version


ARTIFACTS: tuple[ArtifactFile, ...] = (
    ArtifactFile(MODEL_FILE, "ONNX graph; absent for models not exported by design", consumers=frozenset({SERVING, RESCORE})),
    ArtifactFile(SIGNATURE_FILE, "ONNX inputs/outputs (make_signature)", consumers=frozenset({SERVING, RESCORE})),
    ArtifactFile(ITEM_VOCAB_FILE, "internal item id -> token", required=True, consumers=frozenset({SERVING, RESCORE})),
    ArtifactFile(USER_VOCAB_FILE, "internal user id -> token", consumers=frozenset({SERVING, RESCORE})),
    ArtifactFile(CARD_FILE, "the model card", required=True),
    ArtifactFile(METRICS_FILE, "evaluation metrics", required=True),
    ArtifactFile(CONFIG_FILE, "the run's resolved config", required=True),
    ArtifactFile(CHECKPOINT_FILE, "the trained checkpoint", required=True),
    ArtifactFile(CHECKSUMS_FILE, "{file name: sha256} of every other file", required=True),
    ArtifactFile(DATA_PROFILE_FILE, "training data profile: drift checks (core/online/profile.py), popular items "
                 "for learners with no known item (serving)", consumers=frozenset({ONLINE, SERVING})),
)
BY_NAME: dict[str, ArtifactFile] = {a.name: a for a in ARTIFACTS}


def files_for(consumer: str) -> tuple[str, ...]:
    """The names of the files ``consumer`` loads from a version, in contract order."""
    return tuple(a.name for a in ARTIFACTS if consumer in a.consumers)


# Every file the scorer reads; serving verifies each against the version's checksums.
SCORER_FILES = files_for(SERVING)

# --------------------------------------------------------------------------------------------
# The ONNX signature schema

SEQUENTIAL = "sequential"  # inputs: item_seq [B, L] int64, item_seq_len [B] int64
USER = "user"  # inputs: user_id [B] int64
# inputs: history [B, H] int64, the request's item ids padded with 0 (any H, order ignored): the
# item-item models (EASE, ItemKNN) score whoever sends a history, users unseen in training too.
HISTORY = "history"
# inputs: user_id [B] int64, item_id [B] int64 -> ratings [B] float32 on the original rating
# scale (rating models such as FM): one prediction per (user, item) pair, no top-k.
PAIRS = "pairs"
ITEM_SEQ_INPUT = "item_seq"
ITEM_SEQ_LEN_INPUT = "item_seq_len"
USER_INPUT = "user_id"
HISTORY_INPUT = "history"
ITEM_INPUT = "item_id"
SCORES_OUTPUT = "scores"  # [B, n_items + 1] float32 over internal ids; column 0 is padding
RATINGS_OUTPUT = "ratings"  # [B] float32, pairs models only
BATCH_AXIS = "batch"
HISTORY_AXIS = "history_length"
PADDING_ITEM = 0

INPUTS: dict[str, tuple[str, ...]] = {SEQUENTIAL: (ITEM_SEQ_INPUT, ITEM_SEQ_LEN_INPUT), USER: (USER_INPUT,),
                                      HISTORY: (HISTORY_INPUT,), PAIRS: (USER_INPUT, ITEM_INPUT)}
OUTPUTS: dict[str, str] = {SEQUENTIAL: SCORES_OUTPUT, USER: SCORES_OUTPUT, HISTORY: SCORES_OUTPUT,
                           PAIRS: RATINGS_OUTPUT}
INPUT_DTYPE = "int64"
OUTPUT_DTYPE = "float32"
# Shapes by symbolic axis: "batch" and "history_length" are dynamic, "max_seq_length"/"n_items"
# come from the signature.
INPUT_SHAPES: dict[str, tuple[str, ...]] = {
    ITEM_SEQ_INPUT: (BATCH_AXIS, "max_seq_length"),
    ITEM_SEQ_LEN_INPUT: (BATCH_AXIS,),
    USER_INPUT: (BATCH_AXIS,),
    HISTORY_INPUT: (BATCH_AXIS, HISTORY_AXIS),
    ITEM_INPUT: (BATCH_AXIS,),
}
OUTPUT_SHAPE: tuple[str, ...] = (BATCH_AXIS, "n_items")
OUTPUT_SHAPES: dict[str, tuple[str, ...]] = {SCORES_OUTPUT: OUTPUT_SHAPE, RATINGS_OUTPUT: (BATCH_AXIS,)}


def dynamic_axes(kind: str) -> dict[str, dict[int, str]]:
    """``torch.onnx.export``'s ``dynamic_axes``: the batch axis of every input and the output
    (and a history's length)."""
    axes = {name: {0: BATCH_AXIS} for name in (*INPUTS[kind], OUTPUTS[kind])}
    if kind == HISTORY:
        axes[HISTORY_INPUT] = {0: BATCH_AXIS, 1: HISTORY_AXIS}
    return axes


def make_signature(kind: str, *, max_seq_length: int | None, n_items: int,
                   rating_scale: tuple[float, float] | None = None) -> dict[str, Any]:
    """The ``signature.json`` export writes (``n_items`` counts the padding column).

    Args:
        kind: one of ``INPUTS`` (sequential, user, history, pairs).
        max_seq_length: the sequence length of a sequential graph (ignored otherwise).
        n_items: the item vocabulary's size, padding included.
        rating_scale: (min, max) rating a pairs graph's output is on (pairs only).

    Returns:
        The signature as a JSON-ready dict.
    """
    if kind not in INPUTS:
        raise ValueError(f"unknown signature kind {kind!r}; expected one of {sorted(INPUTS)}")
    signature: dict[str, Any] = {
        "kind": kind,
        "inputs": list(INPUTS[kind]),
        "output": OUTPUTS[kind],
        "max_seq_length": int(max_seq_length) if kind == SEQUENTIAL else None,
        "n_items": int(n_items),
        "padding_item": PADDING_ITEM,
        "mask_history": kind in (USER, HISTORY),  # as RecBole's evaluator does
    }
    if kind == PAIRS:
        if rating_scale is None:
            raise ValueError("a pairs signature needs the rating scale its output is on")
        signature["rating_scale"] = [float(rating_scale[0]), float(rating_scale[1])]
    return signature


@dataclass(frozen=True)
class Signature:
    """A parsed ``signature.json`` (old versions' files included: absent keys take defaults)."""

    kind: str
    inputs: tuple[str, ...]
    output: str
    max_seq_length: int  # 0 for user models
    n_items: int | None
    raw: Mapping[str, Any]

    @property
    def sequential(self) -> bool:
        return self.kind == SEQUENTIAL

    @property
    def takes_history(self) -> bool:
        """The graph scores the request's item history (EASE, ItemKNN), whoever the user is."""
        return self.kind == HISTORY

    @property
    def rates_pairs(self) -> bool:
        """The graph predicts one rating per (user, item) pair (FM)."""
        return self.kind == PAIRS


def parse_signature(data: bytes | str | Mapping[str, Any], *, where: str = SIGNATURE_FILE) -> Signature:
    """``signature.json`` (bytes, text or the parsed object) -> ``Signature``; ``RegistryError`` if malformed."""
    try:
        raw = dict(data) if isinstance(data, Mapping) else json.loads(data)
        kind = str(raw["kind"])
        if kind not in INPUTS:
            raise ValueError(f"unknown kind {kind!r}")
        sequential = kind == SEQUENTIAL
        return Signature(
            kind=kind,
            inputs=tuple(raw.get("inputs") or INPUTS[kind]),
            output=str(raw.get("output") or OUTPUTS[kind]),
            max_seq_length=int(raw["max_seq_length"]) if sequential else 0,
            n_items=int(raw["n_items"]) if raw.get("n_items") is not None else None,
            raw=raw,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{where} is not a valid signature: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Checksums: one writer, one verifier


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed (for files that are hashed, not loaded: shipping)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_checksums(version_dir: Path) -> dict[str, str]:
    """{file name: sha256} of every regular file in ``version_dir`` except the checksums file."""
    return {p.name: sha256_file(p) for p in sorted(Path(version_dir).iterdir())
            if p.is_file() and p.name != CHECKSUMS_FILE}


def write_checksums(version_dir: Path) -> dict[str, str]:
    """THE checksum writer: hash every file of ``version_dir`` into its ``checksums.json``.

    Called last while a version is assembled (inside the registry's staging directory), so a
    version is never visible without its checksums.
    """
    sums = compute_checksums(version_dir)
    (Path(version_dir) / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2, sort_keys=True))
    return sums


def read_checksums(version_dir: Path, *, allow_unverified: bool = False) -> dict[str, str] | None:
    """The version's ``checksums.json``; ``None`` only when it has none and ``allow_unverified``.

    A version registered before checksums existed has no ``checksums.json``; it is refused
    unless ``allow_unverified`` (the caller then loads bytes nobody vouched for).
    """
    version_dir = Path(version_dir)
    path = version_dir / CHECKSUMS_FILE
    if not path.is_file():
        if allow_unverified:
            return None
        raise ChecksumError(f"{version_dir.name} has no {CHECKSUMS_FILE} (registered before checksums were "
                            f"written?); re-register it, or pass --allow-unverified to serve it anyway")
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ChecksumError(f"cannot read {version_dir.name}/{CHECKSUMS_FILE}: {exc}") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise ChecksumError(f"{version_dir.name}/{CHECKSUMS_FILE} is not a {{file name: sha256}} object")
    return sums


def verify_digest(where: str, name: str, digest: str, expected: Mapping[str, str]) -> None:
    """THE verifier: raise ``ChecksumError`` unless ``digest`` is what ``expected`` lists for ``name``.

    ``where`` names the version in messages (its directory name).
    """
    want = expected.get(name)
    if want is None:
        raise ChecksumError(f"{where}/{name} is not listed in {CHECKSUMS_FILE}; refusing to load it")
    if digest != want:
        raise ChecksumError(f"checksum mismatch for {where}/{name}: the file changed after it was registered; "
                            f"refusing to load it")


def verify_bytes(where: str, name: str, data: bytes, expected: Mapping[str, str]) -> bytes:
    """``data`` (a file's loaded bytes) if its SHA-256 matches ``expected``; else ``ChecksumError``."""
    verify_digest(where, name, sha256_bytes(data), expected)
    return data


def read_verified(version_dir: Path, name: str, expected: Mapping[str, str] | None) -> bytes:
    """Read ``version_dir/name`` once; verify those very bytes (unless ``expected`` is None) and return them.

    ``RegistryError`` when the file cannot be read, ``ChecksumError`` when it does not match.
    """
    version_dir = Path(version_dir)
    try:
        data = (version_dir / name).read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read {version_dir / name}: {exc.strerror or exc}") from None
    if expected is None:
        return data
    return verify_bytes(version_dir.name, name, data, expected)


def verify_files(version_dir: Path, names: Iterable[str], *, allow_unverified: bool = False) -> None:
    """Raise ``ChecksumError`` unless each present file in ``names`` matches ``checksums.json``.

    Absent files are skipped (optional files such as ``user_ids.json`` are the caller's concern).
    """
    version_dir = Path(version_dir)
    expected = read_checksums(version_dir, allow_unverified=allow_unverified)
    if expected is None:
        return
    for name in names:
        if (version_dir / name).is_file():
            read_verified(version_dir, name, expected)


class VersionReader:
    """Reads a version's files through the verifier: each file's bytes are read once, hashed and returned.

    ``checksums``: the version's ``read_checksums`` result; ``None`` loads unverified bytes.
    """

    def __init__(self, version_dir: Path, checksums: Mapping[str, str] | None) -> None:
        self.version_dir = Path(version_dir)
        self.checksums = checksums

    @classmethod
    def open(cls, version_dir: Path, *, allow_unverified: bool = False) -> VersionReader:
        return cls(version_dir, read_checksums(version_dir, allow_unverified=allow_unverified))

    def has(self, name: str) -> bool:
        return (self.version_dir / name).is_file()

    def read(self, name: str) -> bytes:
        return read_verified(self.version_dir, name, self.checksums)

    def json(self, name: str) -> Any:
        return json.loads(self.read(name).decode("utf-8"))

    def signature(self) -> Signature:
        return parse_signature(self.read(SIGNATURE_FILE), where=f"{self.version_dir.name}/{SIGNATURE_FILE}")
