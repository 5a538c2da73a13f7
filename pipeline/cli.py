"""The one way entry points start: Hydra composition + schema validation + clean user errors.

``@hydra_entry("train")`` turns ``fn(cfg: Config) -> int | None`` into a ``main()`` that
- checks command-line overrides against the schema *before* Hydra runs, so ``train.epcohs=3`` fails
  with "Did you mean 'train.epochs'?" instead of Hydra's generic struct error;
- composes ``conf/`` with Hydra (``--cfg job``, ``--help``, multirun all work as usual) under a run dir
  shared by all torchrun ranks;
- validates the composed config with :func:`pipeline.config.validate`;
- turns expected user errors (bad config, bad data, bad checkpoint) into one clear line and exit code 2.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from pipeline.config import CONF_DIR, Config, ConfigError, is_section, unknown_key, validate
from pipeline.errors import UserError
from pipeline.logging import log_to_run_files


def _groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def _check_syntax(arg: str) -> None:
    """Hydra's override grammar, checked here so that a typo is one line and exit code 2."""
    try:
        OverridesParser.create().parse_overrides([arg])
    except OverrideParseException as err:
        detail = str(err).splitlines()[0] if str(err) else "syntax error"
        raise ConfigError(f"cannot parse the override {arg!r}: {detail}. Quote lists and strings for the shell, "
                          "e.g. 'data.input_size=[320,320]'") from None


def _check_group_option(group: str, value: str) -> None:
    """``model=nope`` -> the options that exist in conf/<group>/. A list (``experiment=[raccoon,fast]``) selects
    several options of one group, applied left to right: each must exist."""
    if value.startswith("[") and value.endswith("]"):
        for item in value[1:-1].split(","):
            _check_group_option(group, item.strip())
        return
    if value in ("", "null") or (CONF_DIR / group / f"{value}.yaml").is_file():
        return
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    raise ConfigError(f"Unknown option '{value}' for config group '{group}'. Available: {', '.join(options)} "
                      f"(files in {CONF_DIR / group})")


def check_overrides(args: list[str]) -> None:
    """Reject ``a.b=c`` overrides whose key is not in the schema, unknown group options (``model=nope``)
    and overrides Hydra cannot parse."""
    groups = _groups()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        _check_syntax(arg)
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in groups and not arg.startswith("~"):
            _check_group_option(key, value.strip())
        if key.startswith("hydra.") or key == "hydra" or key in groups or "/" in key:
            continue
        group = key.split(".")[0]
        if group in groups and not is_section(group):
            continue  # a group outside the schema (experiment.x=...): Hydra reports it
        problem = unknown_key(key)
        if problem:
            raise ConfigError(problem)


def expand_params_flag(argv: list[str]) -> list[str]:
    """``--params FILE.yaml`` (what the DVC stages pass): use a fully composed params file as the primary
    config instead of ``conf/config.yaml``. The run dir stays shared across torchrun ranks."""
    if "--params" not in argv:
        return argv
    i = argv.index("--params")
    if i + 1 >= len(argv):
        raise ConfigError("--params needs a file, e.g. --params params.yaml")
    path = Path(argv[i + 1]).resolve()
    if not path.is_file():
        raise ConfigError(f"--params {argv[i + 1]}: file not found (run `python -m pipeline.config --write` "
                          "to create params.yaml from conf/)")
    rest = argv[:i] + argv[i + 2:]
    # overrides before options (argparse rejects overrides after an option), ours first so the user's win
    return ["hydra.run.dir=outputs/${hydra.job.name}/${run_id:}",
            "hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/${hydra.job.name}_rank${rank:}.log",
            *rest, "--config-dir", str(path.parent), "--config-name", path.stem]


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def hydra_entry(job_name: str) -> Callable[[Callable[[Config], int | None]], Callable[[], None]]:
    def decorate(fn: Callable[[Config], int | None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def main() -> None:
            os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                check_overrides(sys.argv[1:])
                sys.argv[1:] = expand_params_flag(sys.argv[1:])
            except ConfigError as err:
                fail(str(err))
            if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
                sys.argv.insert(1, f"hydra.job.name={job_name}")  # before any option (--cfg job ...)
            result: dict[str, int | None] = {}

            @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
            def _run(raw) -> None:
                log_to_run_files()  # Hydra has set up the run dir's log file by now
                try:
                    cfg = validate(raw)
                    result["code"] = fn(cfg)
                except UserError as err:  # every expected error; anything else is a bug
                    fail(str(err))

            _run()
            code = result.get("code")
            if code:
                sys.exit(code)

        return main

    return decorate
