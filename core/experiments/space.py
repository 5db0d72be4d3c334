"""The search space: which config keys a tuning study varies, and over what range.

A space is YAML (``configs/spaces/*.yaml``, or any file)::

    model: SASRec                       # optional: the model the space is written for
    params:
      training.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      model.params.n_layers: {type: int, low: 1, high: 3}
      model.params.hidden_size: {type: categorical, choices: [32, 64, 128]}

Keys are dotted ``PipelineConfig`` paths (the ones ``--set``/``load_config`` overrides take);
``model.params.<key>`` is any RecBole hyper-parameter of the model. A space is checked when it
is loaded (types, ranges) and against the study's config (``check_space``: the path exists,
every bound and choice makes a valid config), so a typo fails before any data is read.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

# The same merge and error wording load_config uses for flags over a preset.
from core.config import PipelineConfig, _deep_merge, _dotted_to_nested, _format_validation_error
from core.errors import ConfigError

# Trials share the study's data, split and metric, so only keys that change the model or how it
# trains may vary (dataset.max_seq_length only changes the RecBole data each trial builds anyway).
SEARCHABLE_ROOTS = ("model.", "training.")
SEARCHABLE_KEYS = frozenset({"dataset.max_seq_length"})
# Fixed by the study, not by a space.
NOT_SEARCHABLE = {
    "model.name": "the model is the config's (one study, one model; a space per model)",
    "training.max_minutes": "the trial cap is --trial-minutes",
    "training.device": "the device is the config's (--device)",
    "training.threads": "threads are the config's",
}

Choice = None | bool | int | float | str  # what optuna's suggest_categorical stores


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna)")
        return self


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log needs step 1 (Optuna)")
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Choice] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices repeat a value: {self.choices}")
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0, got {low}")


class SearchSpace(_Strict):
    """Dotted config path -> distribution. ``model``: the RecBole model the space is written for."""

    model: str | None = None
    description: str | None = None
    params: dict[str, Param] = Field(min_length=1)
    _origin: str = PrivateAttr(default="<inline>")  # the file it was read from, for messages

    @property
    def origin(self) -> str:
        return self._origin

    def bounds(self, path: str) -> list[Any]:
        """The values a check tries for ``path``: every choice, or both ends of a range (and, for a
        float, a value inside it, so a float range over an integer key fails here, not in a trial)."""
        p = self.params[path]
        if isinstance(p, CategoricalParam):
            return list(p.choices)
        inside = [p.low + (p.high - p.low) * 0.37] if isinstance(p, FloatParam) and p.step is None else []
        return [p.low, p.high, *inside]


def space_names() -> list[str]:
    """The spaces shipped with recflow (``configs/spaces/*.yaml``, package data), by name."""
    return sorted(p.name.removesuffix(".yaml") for p in _shipped().iterdir() if p.name.endswith(".yaml"))


def _shipped() -> Any:
    from importlib import resources

    return resources.files("configs") / "spaces"


def resolve_space_path(path: Path | str) -> Path:
    """A YAML file by path, else a shipped space by name: ``sasrec``, ``sasrec.yaml`` or ``configs/spaces/sasrec.yaml``."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent in (Path("."), Path("configs/spaces"), Path("spaces")):
        shipped = _shipped() / (p.name if p.name.endswith(".yaml") else f"{p.name}.yaml")
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(f"search space not found: {p} (not a file, nor a shipped space: {', '.join(space_names())})")


def load_space(path: Path | str) -> SearchSpace:
    """Read and validate a space file; every mistake is one ``ConfigError`` naming the key."""
    p = resolve_space_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {p} must hold a mapping with a `params:` section")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"search space {p}: " + "; ".join(_space_error(e) for e in err.errors())) from None
    space._origin = str(p)
    for path_ in space.params:
        check_path(path_, origin=f"search space {p}")
    return space


def _space_error(e: Any) -> str:
    # loc is ("params", "<dotted path>", "<type tag>", "<field>"): name the path, drop the tag.
    loc = [str(x) for x in e["loc"]]
    if len(loc) >= 2 and loc[0] == "params":
        loc = loc[1:]
        if len(loc) >= 2 and loc[1] in ("float", "int", "categorical"):
            loc = [loc[0], *loc[2:]]
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "union_tag_invalid":
        msg = "type must be float, int or categorical"
    elif e["type"] == "union_tag_not_found":
        msg = "needs a type: float, int or categorical"
    return f"{'.'.join(loc) or '<root>'}: {msg}"


def check_path(path: str, *, origin: str = "search space") -> None:
    """Raise ``ConfigError`` unless ``path`` names a searchable leaf of ``PipelineConfig``."""
    if path in NOT_SEARCHABLE:
        raise ConfigError(f"{origin}: {path} is set by the study, not searched: {NOT_SEARCHABLE[path]}")
    if not (path.startswith(SEARCHABLE_ROOTS) or path in SEARCHABLE_KEYS):
        raise ConfigError(f"{origin}: {path} cannot be searched: trials share the study's data, split and metric; "
                          f"search model.*, training.* or dataset.max_seq_length")
    node: type[BaseModel] = PipelineConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = node.model_fields.get(part)
        where = ".".join(parts[:i]) or "the config"
        if field is None:
            raise ConfigError(f"{origin}: unknown config path {path} ({where} has no key {part!r}; "
                              f"keys: {', '.join(node.model_fields)})")
        ann = field.annotation
        last = i == len(parts) - 1
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if last:
                raise ConfigError(f"{origin}: {path} is a section; name one of its keys ({', '.join(ann.model_fields)})")
            node = ann
            continue
        is_dict = getattr(ann, "__origin__", None) is dict  # model.params: any RecBole key below it
        if last and is_dict:
            raise ConfigError(f"{origin}: {path} is a section; name one of its keys, e.g. {path}.<key>")
        if last:
            return
        if is_dict:
            if i != len(parts) - 2:
                raise ConfigError(f"{origin}: {path}: name one key below {'.'.join(parts[: i + 1])}")
            return
        raise ConfigError(f"{origin}: unknown config path {path} ({'.'.join(parts[: i + 1])} is a value, not a section)")


def apply_overrides(config: PipelineConfig, overrides: dict[str, Any], *, origin: str = "trial") -> PipelineConfig:
    """``config`` with dotted ``overrides`` applied and validated, as ``load_config`` merges flags into
    a preset; unlike the CLI flags, a None here is a value (a sampled choice), not "unset"."""
    merged = _deep_merge(config.model_dump(mode="json", exclude_unset=False), _dotted_to_nested(overrides))
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def check_space(space: SearchSpace, config: PipelineConfig) -> None:
    """Check ``space`` against the study's ``config``: the model it was written for, RecBole's
    keys under ``model.params``, and every bound and choice giving a valid config."""
    origin = f"search space {space.origin}"
    if space.model and space.model.lower() != config.model.name.lower():
        raise ConfigError(f"{origin} is written for {space.model}, but the config trains {config.model.name} "
                          f"(pick the space for {config.model.name}, or drop `model:` from the space)")
    known = recbole_defaults(config.model.name)
    for path, param in space.params.items():
        key = path.removeprefix("model.params.")
        if path.startswith("model.params.") and known:
            if key not in known:
                own = recbole_defaults(config.model.name, model_only=True)
                raise ConfigError(f"{origin}: {path}: {config.model.name} has no hyper-parameter {key!r} "
                                  f"(its keys: {', '.join(sorted(own))})")
            default = known[key]
            if isinstance(param, FloatParam) and isinstance(default, int) and not isinstance(default, bool):
                raise ConfigError(f"{origin}: {path}: {config.model.name}'s {key} is an integer (default {default}); "
                                  f"use type: int or categorical")
        for value in space.bounds(path):
            apply_overrides(config, {path: value}, origin=f"{origin}, {path}={value!r}")


@functools.cache
def recbole_defaults(model_name: str, *, model_only: bool = False) -> dict[str, Any]:
    """RecBole's hyper-parameters for ``model_name`` with their defaults (its properties YAML, plus
    the general ones unless ``model_only``), read from RecBole's files without importing it; empty
    when the model has no such file (then ``model.params`` keys are not checked)."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return {}
    props = Path(next(iter(spec.submodule_search_locations))) / "properties"
    model_file = next((f for f in (props / "model").glob("*.yaml") if f.stem.lower() == model_name.lower()), None)
    if model_file is None:
        return {}
    out: dict[str, Any] = {}
    for f in [props / "overall.yaml", model_file][1 if model_only else 0:]:
        loaded = yaml.safe_load(f.read_text()) or {}
        out |= loaded if isinstance(loaded, dict) else {}
    return out


def sample(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's values for every key in ``space``, as dotted overrides (Optuna params keep the path as name)."""
    out: dict[str, Any] = {}
    for path, p in space.params.items():
        if isinstance(p, FloatParam):
            out[path] = trial.suggest_float(path, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[path] = trial.suggest_int(path, p.low, p.high, log=p.log, step=p.step)
        else:
            out[path] = trial.suggest_categorical(path, p.choices)
    return out
