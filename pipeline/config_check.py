"""The app's entry point around Hydra, and the config checks that run before any work.

* Where the configs are: ``conf/`` at the top of the repository in a checkout (and an editable
  install), ``pipeline/conf`` inside an installed wheel (pyproject maps one onto the other).
* A misspelt key (``train.epohcs=3``) fails in one line naming the key and the close matches, with
  exit status 2, instead of Hydra's multi-line composition error.
* :func:`check_config` checks every setting against the type of its default (from the same YAML
  files, composed with the run's group choices) plus a small table of ranges, so that
  ``train.epochs=abc`` or ``explain.occlusion.stride=-1`` fail before any work.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import PipelineError, suggest
from pipeline.settings import plain

_HERE = Path(__file__).resolve().parent
# a wheel carries the configs inside the package; a checkout keeps them at the repository's top
CONF_DIR = str(_HERE / "conf") if (_HERE / "conf" / "config.yaml").is_file() else str(_HERE.parent / "conf")
CONFIG_NAME = "config"
USER_ERROR = 2

# (glob on the full key, what the value must be); a key that matches must not be null either
RANGES: tuple[tuple[str, str], ...] = (
    ("*epochs", "positive"), ("*batch_size", "positive"), ("*internal_batch_size", "positive"),
    ("*.stride", "positive"), ("*.window", "positive"), ("*.steps", "positive"), ("*.samples", "positive"),
    ("*.masks", "positive"), ("*.cells", "positive"), ("*.k", "positive"), ("*top_k", "positive"),
    ("*.top_k", "positive"), ("*.top", "positive"), ("*part_size", "positive"), ("*.thumb", "positive"),
    ("*.tile_size", "positive"), ("*.map_size", "positive"), ("*n_train", "positive"),
    ("*n_test", "positive"), ("*.canvas", "positive"), ("*.lr", "positive"), ("*poll_s", "positive"),
    ("num_shards", "positive"), ("shard", "non-negative"), ("*num_workers", "non-negative"),
    ("*.threads", "positive"), ("*weight_decay", "non-negative"), ("*sigma", "non-negative"),
    ("*.p", "fraction"), ("*.alpha", "fraction"), ("*quantile", "fraction"), ("*.iou", "fraction"),
    ("*.threshold", "fraction"), ("*.noise", "non-negative"), ("report.microscope.visualize", "non-negative"),
    ("dissect.cut", "fraction"),
)
EXPECTED = {"positive": "a positive number", "non-negative": "a number >= 0", "fraction": "a number in [0, 1]"}


def hydra_entry(task: Callable[[DictConfig], None]) -> Callable[[], None]:
    """``@hydra.main`` on the app's configs, after a check of the command line's keys."""
    import hydra

    hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=CONFIG_NAME)(task)

    @functools.wraps(task)
    def entry() -> None:
        try:
            check_override_keys(sys.argv[1:])
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(USER_ERROR)
        hydra_main()

    return entry


def check_override_keys(argv: list[str]) -> None:
    """Compose the config with the command line's overrides and turn an unknown key into one line.

    Runs only for a plain run whose overrides hold no sweep; anything else (and any other
    composition error) is left to Hydra, which reports it the same way as before."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.config_name or not args.overrides):
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says where
        return
    if any(o.is_sweep_override() for o in parsed):
        return
    overrides = [text for text, o in zip(args.overrides, parsed) if not o.key_or_group.startswith("hydra")]
    _compose(overrides)


def _compose(overrides: list[str]) -> None:
    """Compose the config as Hydra will; an unknown key raises, any other failure is Hydra's to say."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(CONFIG_NAME, overrides=overrides)
    except ConfigCompositionException as e:
        if isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
            raise PipelineError(_unknown_key(e.__cause__, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def _unknown_key(err: Any, overrides: list[str]) -> str:
    """'unknown key train.epohcs (given train.epohcs=3). Did you mean: train.epochs? ...'"""
    full_key = str(getattr(err, "full_key", "") or "")
    given = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == full_key), full_key)
    parent, _, _ = full_key.rpartition(".")
    default = _compose_defaults(tuple(o for o in overrides if "." not in o.split("=", 1)[0] and o[0] not in "+~"))
    node = OmegaConf.select(default, parent) if parent else default
    siblings = [f"{parent}.{k}" if parent else str(k) for k in node] if isinstance(node, DictConfig) else []
    return (f"unknown key {full_key} (given {given}).{suggest(full_key, siblings, n=3)} "
            f"To add a new key, write +{given.lstrip('+')}.")


@functools.lru_cache(maxsize=8)
def _compose_defaults(choices: tuple[str, ...]) -> DictConfig:
    """The config with these group choices (``model=timm``, ...) and no other override."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    state = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(CONFIG_NAME, overrides=list(choices))
    finally:
        GlobalHydra.instance().clear()
        if state is not None:
            GlobalHydra.instance().initialize(state)


def check_config(cfg: DictConfig) -> None:
    """Before any work: every setting has its default's type (an integer stays an integer, ...) and
    the knobs in :data:`RANGES` are in range; the first that is not raises one line naming it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        choices: dict[str, Any] = {}
    else:
        choices = dict(HydraConfig.get().runtime.choices)
    picked = tuple(sorted(f"{g}={c}" for g, c in choices.items()
                          if c is not None and not g.startswith("hydra") and "/" not in g))
    defaults = _compose_defaults(picked)
    for key, default, value in _leaves(defaults, cfg, ""):
        problem = _problem(key, default, value)
        if problem:
            shown = "null" if value is None else repr(value)
            raise PipelineError(f"{key}={shown} is not valid: expected {problem}.")


def _leaves(default: DictConfig, cfg: DictConfig, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(full key, default, value) of every scalar setting present in both configs, resolved."""
    for k in default:
        key = f"{prefix}{k}"
        if key == "hydra" or k not in cfg:
            continue
        d, v = default._get_node(k), cfg._get_node(k)
        if isinstance(d, DictConfig):
            if isinstance(v, DictConfig):
                yield from _leaves(d, v, f"{key}.")
            continue
        try:
            yield key, _resolved(default, k), _resolved(cfg, k)
        except Exception:  # noqa: BLE001 - an interpolation only a Hydra run resolves: not ours to judge
            continue


def _resolved(cfg: DictConfig, key: Any) -> Any:
    value = cfg[key]
    return plain(value)


def _problem(key: str, default: Any, value: Any) -> str:
    """What ``value`` should have been, or '' when it is fine."""
    rule = next((r for pattern, r in RANGES if fnmatchcase(key, pattern)), None)
    if value is None:
        return EXPECTED[rule] if rule and default is not None else ""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return "a positive integer" if rule == "positive" else "an integer"
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return EXPECTED[rule] if rule else "a number"
    else:
        return ""
    if rule == "positive" and not value > 0:
        return "a positive integer" if isinstance(default, int) else EXPECTED[rule]
    if rule == "non-negative" and value < 0:
        return EXPECTED[rule]
    if rule == "fraction" and not 0 <= value <= 1:
        return EXPECTED[rule]
    return ""
