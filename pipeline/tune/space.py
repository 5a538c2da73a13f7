"""Declarative Ray Tune search spaces (``sweeps/NAME.yaml``): load, check, expand, turn into overrides.

A sweep file names config keys and how to sample them; every trial is the ordinary training run
composed from ``base_overrides + command-line overrides + the sampled values`` (plus keys tied to a
sampled one). :func:`validate_space` composes every combination of the categorical choices with every
bound of the continuous ones through :func:`pipeline.config.compose` *before* Ray starts, so an
impossible combination fails at once with the sweep file, the keys and the values named.
"""
from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import CONF_DIR, ConfigError, compose, is_section, unknown_key
from pipeline.errors import UserError

SWEEPS_DIR = CONF_DIR.parent / "sweeps"
MAX_COMBINATIONS = 512  # ~0.1 s per compose: beyond this the up-front check takes minutes

TOP_KEYS = ("name", "description", "metric", "mode", "num_samples", "max_concurrent", "resources",
            "workers_per_trial", "scheduler", "max_failures", "base_overrides", "space", "tied", "derived")
CATEGORICAL = ("choice", "grid")  # grid: every value once per num_samples (tune.grid_search)
CONTINUOUS = ("uniform", "loguniform", "randint")  # [low, high], randint inclusive of both
SCHEDULER_KEYS = {"asha": ("type", "grace_period", "reduction_factor", "max_t"), "fifo": ("type",)}
RESOURCE_KEYS = ("cpu", "gpu")
_NUM = r"[0-9]+(?:\.[0-9]*)?"
_KEY = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_DERIVED = re.compile(rf"^\s*(?:({_NUM})\s*\*\s*)?({_KEY})(?:\s*\*\s*({_NUM}))?\s*$")


class SweepError(UserError, ValueError):
    """A problem with a sweep file or its search space; the message names the file, key and value."""


@dataclass(frozen=True)
class Dimension:
    """One sampled key: ``kind`` in CATEGORICAL + CONTINUOUS, ``values`` the choices or [low, high]."""

    key: str
    kind: str
    values: tuple[Any, ...]  # the choices, or [low, high]: both are what the up-front check composes


@dataclass
class Sweep:
    path: Path
    name: str
    metric: str = "mAP"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent: int | None = None
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    workers_per_trial: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    max_failures: int = 0
    base_overrides: list[str] = field(default_factory=list)
    space: list[Dimension] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)  # target key -> sampled key
    derived: dict[str, tuple[float, str]] = field(default_factory=dict)  # target -> (factor, sampled key)
    description: str = ""

    def fail(self, key: str, msg: str) -> SweepError:
        return SweepError(f"{self.path}: '{key}': {msg}")


# ------------------------------------------------------------------------------------- loading
def resolve_path(name_or_path: str) -> Path:
    """``demo_cpu`` -> sweeps/demo_cpu.yaml; a path to a .yaml file is used as is."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise SweepError(f"sweep file {path} not found; shipped sweeps: {', '.join(known) or 'none'} "
                         "(or pass sweep=path/to/file.yaml)")
    return path.resolve()


def _unknown(path: Path, where: str, key: str, valid: tuple[str, ...] | list[str]) -> SweepError:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return SweepError(f"{path}: unknown key '{where}{key}'.{hint} Valid keys: {', '.join(valid)}")


def _number(sweep: Sweep, key: str, value: Any, kind: type, low: float, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
    if not ok or value < low:
        raise sweep.fail(key, f"must be {'an integer' if kind is int else 'a number'} >= {low}, got {value!r}")
    return kind(value)


def config_key_error(key: str) -> str | None:
    """None when ``key`` is a config key (or a config group such as ``model``), else the reason."""
    if "." not in key and (CONF_DIR / key).is_dir():
        return None
    problem = unknown_key(key)
    if problem:
        return problem
    if is_section(key):  # a whole section, e.g. model.head
        return f"'{key}' is a config section, not a value; sample one of its keys"
    return None


def _dimension(sweep: Sweep, key: str, spec: Any) -> Dimension:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise sweep.fail(where, f"needs exactly one distribution, e.g. {{choice: [a, b]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in CATEGORICAL + CONTINUOUS:
        raise _unknown(sweep.path, f"{where}.", kind, CATEGORICAL + CONTINUOUS)
    if not isinstance(values, list) or not values:
        raise sweep.fail(f"{where}.{kind}", f"needs a non-empty list, got {values!r}")
    if kind in CONTINUOUS:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or values[0] > values[1]:
            raise sweep.fail(f"{where}.{kind}", f"needs [low, high] numbers with low <= high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise sweep.fail(f"{where}.{kind}", f"needs low > 0, got {values!r}")
        if kind == "randint" and any(v != int(v) for v in values):
            raise sweep.fail(f"{where}.{kind}", f"needs integer bounds, got {values!r}")
    return Dimension(key, kind, tuple(values))


def _derived(sweep: Sweep, target: str, expr: Any) -> tuple[float, str]:
    match = _DERIVED.match(str(expr)) if isinstance(expr, (str, int)) else None
    if not match or (match.group(1) and match.group(3)):
        raise sweep.fail(f"derived.{target}", f"{expr!r} is not 'KEY' or 'NUMBER * KEY' (nothing else is "
                         "evaluated), e.g. \"2 * model.neck.out_channels\"")
    factor = match.group(1) or match.group(3) or "1"
    return (float(factor) if "." in factor else int(factor)), match.group(2)


def load_sweep(name_or_path: str) -> Sweep:
    """Read and check a sweep file (structure, distributions, keys); the values are checked later."""
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: must be a mapping with at least 'space'")
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(path, "", key, TOP_KEYS)
    sweep = Sweep(path=path, name=str(raw.get("name", path.stem)))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep.name):
        raise sweep.fail("name", f"{sweep.name!r} must use only letters, digits, '_', '-', '.' (used in file names)")
    sweep.description = str(raw.get("description", ""))
    sweep.metric = str(raw.get("metric", sweep.metric))
    sweep.mode = str(raw.get("mode", sweep.mode))
    if sweep.mode not in ("max", "min"):
        raise sweep.fail("mode", f"must be 'max' or 'min', got {sweep.mode!r}")
    sweep.num_samples = _number(sweep, "num_samples", raw.get("num_samples", sweep.num_samples), int, 1)
    sweep.max_concurrent = _number(sweep, "max_concurrent", raw.get("max_concurrent"), int, 1, allow_none=True)
    sweep.workers_per_trial = _number(sweep, "workers_per_trial", raw.get("workers_per_trial", 1), int, 1)
    sweep.max_failures = _number(sweep, "max_failures", raw.get("max_failures", 0), int, 0)
    _load_resources(sweep, raw.get("resources", {}))
    _load_scheduler(sweep, raw.get("scheduler", {"type": "asha"}))
    base = raw.get("base_overrides", [])
    if not isinstance(base, list) or not all(isinstance(o, str) and "=" in o for o in base):
        raise sweep.fail("base_overrides", f"must be a list of 'key=value' strings, got {base!r}")
    sweep.base_overrides = list(base)
    _load_space(sweep, raw.get("space"), raw.get("tied") or {}, raw.get("derived") or {})
    return sweep


def _load_resources(sweep: Sweep, raw: Any) -> None:
    if not isinstance(raw, dict):
        raise sweep.fail("resources", f"must be a mapping like {{cpu: 1, gpu: 0}}, got {raw!r}")
    for key in raw:
        if key not in RESOURCE_KEYS:
            raise _unknown(sweep.path, "resources.", key, RESOURCE_KEYS)
    sweep.resources = {"cpu": _number(sweep, "resources.cpu", raw.get("cpu", 1), float, 0),
                       "gpu": _number(sweep, "resources.gpu", raw.get("gpu", 0), float, 0)}


def _load_scheduler(sweep: Sweep, raw: Any) -> None:
    if not isinstance(raw, dict) or raw.get("type") not in SCHEDULER_KEYS:
        raise sweep.fail("scheduler.type", f"must be one of {list(SCHEDULER_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in SCHEDULER_KEYS[raw["type"]]:
            raise _unknown(sweep.path, "scheduler.", key, SCHEDULER_KEYS[raw["type"]])
    sweep.scheduler = {"type": raw["type"]}
    if raw["type"] == "asha":
        sweep.scheduler["grace_period"] = _number(sweep, "scheduler.grace_period", raw.get("grace_period", 1), int, 1)
        sweep.scheduler["reduction_factor"] = _number(
            sweep, "scheduler.reduction_factor", raw.get("reduction_factor", 2), float, 1.01)
        sweep.scheduler["max_t"] = _number(sweep, "scheduler.max_t", raw.get("max_t"), int, 1, allow_none=True)


def _load_space(sweep: Sweep, space: Any, tied: Any, derived: Any) -> None:
    if not isinstance(space, dict) or not space:
        raise sweep.fail("space", "must be a non-empty mapping of config key -> {distribution: values}")
    for section, mapping in (("tied", tied), ("derived", derived)):
        if not isinstance(mapping, dict):
            raise sweep.fail(section, f"must be a mapping target key -> source, got {mapping!r}")
    for key, spec in space.items():
        problem = config_key_error(str(key))
        if problem:
            raise sweep.fail(f"space.{key}", problem)
        sweep.space.append(_dimension(sweep, str(key), spec))
    sampled = {d.key for d in sweep.space}
    for section, mapping in (("tied", tied), ("derived", derived)):
        for target, source in mapping.items():
            problem = config_key_error(str(target))
            if problem:
                raise sweep.fail(f"{section}.{target}", problem)
            if target in sampled or target in sweep.tied or target in sweep.derived:
                raise sweep.fail(f"{section}.{target}", "is already set by the space (or twice); set each key once")
            factor, key = _derived(sweep, target, source) if section == "derived" else (1, str(source))
            if key not in sampled:
                raise sweep.fail(f"{section}.{target}", f"source '{key}' is not a key of 'space' "
                                 f"(sampled keys: {', '.join(sorted(sampled))})")
            if section == "tied":
                sweep.tied[str(target)] = key
            else:
                sweep.derived[str(target)] = (factor, key)


# --------------------------------------------------------------------------- samples -> overrides
def format_value(value: Any) -> str:
    """A Python value as a Hydra override value (lists, numbers, bools, null, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return quoted(str(value))


def quoted(text: str) -> str:
    """A Hydra override value that stays a string whatever it looks like: a Ray trial id such as
    ``90414_00000`` is otherwise read as the integer 9041400000. In Hydra's quoted strings a quote is
    escaped with a backslash, and backslashes only need doubling right before a quote or the closing one."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def expand_sample(sweep: Sweep, sample: dict[str, Any]) -> dict[str, Any]:
    """Sampled values plus the tied and derived keys, in a stable order (space, tied, derived)."""
    values = {d.key: sample[d.key] for d in sweep.space}
    for target, source in sweep.tied.items():
        values[target] = values[source]
    for target, (factor, source) in sweep.derived.items():
        value = values[source]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise sweep.fail(f"derived.{target}", f"source '{source}' = {value!r} is not a number")
        product = factor * value
        values[target] = int(product) if isinstance(product, float) and product.is_integer() else product
    return values


def sample_overrides(sweep: Sweep, sample: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in expand_sample(sweep, sample).items()]


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Ray Tune's param_space: one flat entry per sampled key (dotted names are just dict keys)."""
    from ray import tune  # ray is optional and heavy: imported only when a sweep runs

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {d.key: make[d.kind](list(d.values)) for d in sweep.space}


# ---------------------------------------------------------------------------- up-front validation
def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


def validate_space(sweep: Sweep, overrides: list[str]) -> int:
    """Compose every categorical combination x continuous bound; raise SweepError naming the bad ones.

    ``overrides`` are the base overrides (sweep file + command line). Returns the number composed.
    """
    _check_not_overridden(sweep, overrides)
    try:
        compose(overrides)
    except ConfigError as err:
        raise SweepError(f"{sweep.path}: the base config (overrides {overrides}) is invalid: {err}") from None
    grid = [d.values for d in sweep.space]
    total = math.prod(len(g) for g in grid)
    if total > MAX_COMBINATIONS:
        raise SweepError(f"{sweep.path}: {total} combinations of choices and bounds to check (limit "
                         f"{MAX_COMBINATIONS}); use fewer choices per key or split the sweep into several files")
    keys = [d.key for d in sweep.space]
    bad: list[str] = []
    single_cache: dict[tuple[str, str], str | None] = {}
    for combo in itertools.product(*grid):
        sample = dict(zip(keys, combo))
        try:
            compose(overrides + sample_overrides(sweep, sample))
        except (ConfigError, SweepError) as err:
            bad.append(_blame(sweep, overrides, sample, str(err), single_cache))
    if bad:
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise SweepError(f"{sweep.path}: {len(bad)} of {total} combinations of the search space are invalid "
                         "(nothing was run):\n  " + "\n  ".join(dict.fromkeys(bad[:5])) + more)
    return total


def _check_not_overridden(sweep: Sweep, overrides: list[str]) -> None:
    """A key the sweep sets must not also be fixed by an override (the sampled value would hide it)."""
    owned = {d.key: "space" for d in sweep.space}
    owned |= dict.fromkeys(sweep.tied, "tied") | dict.fromkeys(sweep.derived, "derived")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in owned:
            raise SweepError(f"{sweep.path}: '{key}' is set by '{owned[key]}' and also by the override {override!r} "
                             "(base_overrides or command line); drop one of them")


def _blame(sweep: Sweep, overrides: list[str], sample: dict[str, Any], error: str,
           cache: dict[tuple[str, str], str | None]) -> str:
    """Name the single key=value that fails on its own, else the whole combination."""
    for key, value in sample.items():
        tag = (key, format_value(value))
        if tag not in cache:
            one = {k: (value if k == key else None) for k in sample}
            try:
                compose(overrides + _partial_overrides(sweep, one))
                cache[tag] = None
            except (ConfigError, SweepError) as err:
                cache[tag] = str(err)
        if cache[tag]:
            return f"space.{key}={tag[1]} fails on its own (other keys at their base values): {cache[tag]}"
    return f"the combination {_describe(expand_sample(sweep, sample))} is invalid: {error}"


def _partial_overrides(sweep: Sweep, sample: dict[str, Any]) -> list[str]:
    """Overrides for the keys of ``sample`` that are set (not None), with their tied/derived keys."""
    full = expand_sample(sweep, {k: (v if v is not None else 0) for k, v in sample.items()})
    chosen = {k for k, v in sample.items() if v is not None}
    chosen |= {t for t, s in sweep.tied.items() if s in chosen}
    chosen |= {t for t, (_, s) in sweep.derived.items() if s in chosen}
    return [f"{k}={format_value(v)}" for k, v in full.items() if k in chosen]
