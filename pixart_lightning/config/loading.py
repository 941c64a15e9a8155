"""YAML files and command-line overrides merged onto the typed config, with where each value was set.

A stage's config is ``StageConfig`` defaults ← base.yaml ← stageN.yaml ← command-line ``key=value`` overrides
(``stage2.optim.lr=1e-4`` targets one stage). omegaconf merges the layers and checks the types against a schema
derived from the dataclasses (:func:`_omegaconf_schema`); the dataclasses are then built from the merged values
and validated.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pixart_lightning.config.schema import STAGES, ConfigError, type_hints
from pixart_lightning.config.stage import LR_REFERENCE_BATCH, StageConfig
from pixart_lightning.config.validation import validate


def _section_class(hint: Any) -> type | None:
    """The config dataclass a field holds (``SynthSection | None`` holds SynthSection); None for a value."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _schema_type(hint: Any) -> Any:
    """``hint`` as omegaconf can check it: a Literal becomes its values' type, a section its schema."""
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    if typing.get_origin(hint) is types.UnionType:
        return functools.reduce(operator.or_, map(_schema_type, typing.get_args(hint)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _omegaconf_schema(hint)
    return hint


@functools.cache
def _omegaconf_schema(cls: type) -> type:
    """``cls`` with each Literal typed by its values' type (omegaconf 2.3 refuses Literal annotations), for merging
    and type checks; the choices are checked by :func:`validate`, which names them all at once."""
    fields = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            factory = f.default_factory
            section = isinstance(factory, type) and dataclasses.is_dataclass(factory)
            default = dataclasses.field(default_factory=_omegaconf_schema(factory) if section else factory)
        else:
            default = dataclasses.field(default=f.default)
        fields.append((f.name, _schema_type(type_hints(cls)[f.name]), default))
    return dataclasses.make_dataclass(cls.__name__, fields, kw_only=True)


def _build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the config dataclass ``cls`` (its sections too) from merged, resolved values."""
    hints = type_hints(cls)
    return cls(**{name: _build(section, value) if (section := _section_class(hints[name])) and value is not None
                  else value for name, value in values.items()})


def _section_fields(path: str) -> list[str]:
    """Valid keys at a dotted path of StageConfig ("" for the top level)."""
    cls: type | None = StageConfig
    for part in [p for p in path.split(".") if p]:
        cls = _section_class(type_hints(cls).get(part))
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _merge(*layers: Any) -> StageConfig:
    """Merge layers onto the schema; omegaconf errors become one-line ConfigErrors naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(_omegaconf_schema(StageConfig)), *layers)
        values = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = err.full_key or str(err.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _section_fields(parent)
        raise ConfigError(f"unknown key {key!r}" + (f"; valid keys there: {', '.join(valid)}" if valid else "")) from None
    except ValidationError as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    return _build(StageConfig, values)  # type: ignore[arg-type]


def _stage_dotlist(overrides: list[str], stage: int) -> list[str]:
    """The ``key=value`` pairs for this stage: plain keys apply to every stage, ``stageN.key`` to stage N only."""
    picked = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        head, _, rest = key.partition(".")
        if (rest if head.startswith("stage") and rest else key) in ("stage", "phases"):
            raise ConfigError(f"override {item!r}: 'stage' and 'phases' come from the config folder's files")
        if head in {f"stage{s}" for s in STAGES}:
            if head == f"stage{stage}":
                picked.append(f"{rest}={value}")
        else:
            picked.append(item)
    return picked


def stage_overrides(overrides: list[str], stage: int) -> DictConfig:
    """The command-line overrides that apply to this stage, as a config layer."""
    try:
        return OmegaConf.from_dotlist(_stage_dotlist(overrides, stage))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {err}") from None


def _is_leaf_field(key: str) -> bool:
    """Whether a dotted key names a value of StageConfig (not a section)."""
    parent, _, name = key.rpartition(".")
    return name in _section_fields(parent) and not _section_fields(key)


KEY_PATTERN = r"[A-Za-z_]\w*(?:\.\w+)*"
"""A dotted key as problems name it (``data.resolution``)."""


def _yaml_line(path: Path, key: str) -> int | None:
    """The line of ``path`` that sets the dotted ``key`` (list items by index: ``phases.1.data.resolution``) to a
    value, not a section; None where the file does not set it."""
    node, line = yaml.compose(path.read_text()), None
    for part in key.split("."):
        if isinstance(node, yaml.MappingNode):
            found = [(k.start_mark.line, v) for k, v in node.value if k.value == part]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            found = [(node.value[int(part)].start_mark.line, node.value[int(part)])]
        else:
            return None
        if not found:
            return None
        line, node = found[-1][0] + 1, found[-1][1]
    return None if isinstance(node, yaml.MappingNode) else line


@dataclasses.dataclass(frozen=True)
class ValueOrigins:
    """Where a stage's values are set, the first that sets a key winning: the command line, then (for a phase)
    its entry in the stage file, the stage file, base.yaml; a config field none of them sets has its default.

    omegaconf keeps no origin or line with a merged value, so a key is looked up in each source again.
    """

    overridden: tuple[str, ...]
    """The keys this stage's command-line overrides set."""
    files: tuple[Path, ...]
    """The stage file, then base.yaml (or a unit's saved config.yaml); empty when the config folder is unknown."""

    @classmethod
    def of_stage(cls, folder: str | Path | None, stage: int, overrides: list[str]) -> ValueOrigins:
        files = (Path(folder) / f"stage{stage}.yaml", Path(folder) / "base.yaml") if folder else ()
        keys = tuple(item.split("=", 1)[0] for item in _stage_dotlist(overrides, stage))
        return cls(keys, tuple(f for f in files if f.is_file()))

    def origin(self, key: str, phase: int | None = None) -> str | None:
        """``command line``, ``FILE:LINE`` or ``default``; None for a key no source sets and no field has."""
        if any(key == k or key.startswith(f"{k}.") for k in self.overridden):
            return "command line"
        lookups = [(self.files[0], f"phases.{phase}.{key}")] if phase is not None and self.files else []
        for path, dotted in [*lookups, *((f, key) for f in self.files)]:
            if (line := _yaml_line(path, dotted)) is not None:
                return f"{path}:{line}"
        return "default" if self.files and _is_leaf_field(key) else None

    def blame(self, problem: str, phase: int | None = None) -> str:
        """The problem led by the origin of the first key it names; the origins of other values it shows
        (``key=value``) follow it."""
        first = next((key for key in re.findall(KEY_PATTERN, problem) if self.origin(key, phase)), None)
        if first is None:
            return problem
        shown = [key for key in dict.fromkeys(re.findall(f"({KEY_PATTERN})=", problem)) if key != first]
        others = [f"{key}: {origin}" for key in shown if (origin := self.origin(key, phase))]
        return f"{self.origin(first, phase)}: {problem}" + (f" [{', '.join(others)}]" if others else "")


def load_stage(folder: str | Path, stage: int, overrides: list[str] | None = None) -> StageConfig:
    """Load ``folder/base.yaml`` + ``folder/stage<N>.yaml`` + overrides as a validated StageConfig."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"config folder {folder} does not exist (try configs/demo)")
    stage_file = folder / f"stage{stage}.yaml"
    if not stage_file.is_file():
        found = sorted(p.stem for p in folder.glob("stage*.yaml"))
        raise ConfigError(f"{stage_file} does not exist; this config has {', '.join(found) or 'no stages'}")
    layers = [OmegaConf.create({"name": folder.resolve().name})]  # the folder's name, unless a file sets one
    layers += [OmegaConf.load(p) for p in (folder / "base.yaml", stage_file) if p.is_file()]
    layers.append(OmegaConf.create({"stage": stage}))
    layers.append(stage_overrides(overrides or [], stage))
    try:
        cfg = validate(_merge(*layers))
    except ConfigError as err:
        origins = ValueOrigins.of_stage(folder, stage, overrides or [])
        raise ConfigError(*(origins.blame(p) for p in err.problems), context=f"stage {stage}") from None
    cfg.overrides = list(overrides or [])
    return cfg


def phase_configs(cfg: StageConfig, folder: str | Path | None = None) -> list[tuple[str | None, StageConfig]]:
    """The stage's sub-runs: ``[(None, cfg)]``, or one validated config per entry of ``phases``.

    Command-line overrides are applied again on top of each phase, so they win over the phase's values.
    ``folder`` (the config folder) lets errors name the file and line that set a value.
    """
    if not cfg.phases:
        return [(None, cfg)]
    base = dataclasses.asdict(dataclasses.replace(cfg, phases=[]))
    again = stage_overrides(cfg.overrides, cfg.stage)
    out = []
    for index, phase in enumerate(cfg.phases):
        changes = OmegaConf.create({k: v for k, v in phase.items() if k != "name"})
        try:
            phase_cfg = validate(_merge(base, changes, again))
        except ConfigError as err:
            origins = ValueOrigins.of_stage(folder, cfg.stage, cfg.overrides)
            raise ConfigError(*(origins.blame(p, index) for p in err.problems),
                              context=f"stage {cfg.stage} ({phase.get('name', index)})") from None
        phase_cfg.overrides = cfg.overrides
        out.append((str(phase["name"]), phase_cfg))
    return out


def derived_values(cfg: StageConfig) -> list[str]:
    """What follows from the config rather than being set in it: the batch plan and the learning rate."""
    plan = cfg.batch_plan()
    lr = cfg.learning_rate()
    scaling = (f"optim.lr {cfg.optim.lr} x sqrt(global batch {plan.global_batch} / {LR_REFERENCE_BATCH}) = {lr} "
               "(optim.scale_lr)" if cfg.optim.scale_lr else f"optim.lr {lr} (optim.scale_lr off)")
    return [f"learning rate = {scaling}",
            f"global batch {plan.global_batch} = micro-batch {plan.micro} x {plan.accumulation} accumulation steps "
            f"x {plan.world_size} processes"]


def to_yaml(cfg: StageConfig) -> str:
    """The resolved config as YAML (saved in every run folder), led by comments giving its derived values;
    :func:`load_saved` reads it back."""
    header = "".join(f"# derived: {line}\n" for line in derived_values(cfg))
    return header + OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def load_saved(path: str | Path) -> StageConfig:
    """A unit's resolved ``config.yaml`` (written by :func:`to_yaml`) read back as a validated StageConfig.

    Problems name the key and the file's line that sets it, as :func:`load_stage`'s do.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (a unit's resolved config.yaml)")
    try:
        return validate(_merge(OmegaConf.load(path)))
    except ConfigError as err:
        origins = ValueOrigins((), (path,))
        raise ConfigError(*(origins.blame(p) for p in err.problems)) from None
