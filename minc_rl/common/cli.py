"""The checks every entry point (train, pretrain, linear_eval) makes before Hydra starts: one-line errors with exit
code 2, group options and keys checked against the config (Hydra would advise `+key=value` for a misspelt key,
which is then ignored), and the same message shape everywhere: `<program>: error: <what is wrong and what to do>`."""

from __future__ import annotations

import difflib
import re
import string
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf


def fail(program: str, message: str) -> NoReturn:
    """Print one line naming the bad value and the valid ones, and exit with code 2 (a usage error)."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def dotted_keys(node: Any, prefix: str = "") -> set[str]:
    """The dotted paths of every key in nested dicts."""
    keys = set()
    for key, value in node.items() if isinstance(node, dict) else ():
        keys.add(prefix + str(key))
        keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


def unknown_key_message(key: str, valid: set[str], program: str) -> str:
    """`<key> is not a key of <program>'s config; did you mean <closest>?` (or where the keys are listed)."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"python -m {program} --help lists the keys"
    return f"{key} is not a key of {program}'s config; {hint}"


def group_options(config_dir: Path, group: str) -> list[str]:
    """The options of a config group: the YAML files in <config_dir>/<group>/."""
    return sorted(path.stem for path in (config_dir / group).glob("*.yaml"))


def check_overrides(program: str, args: list[str], config_dir: Path, config_name: str, groups: tuple[str, ...],
                    required: tuple[str, ...] = ()) -> None:
    """Exit 2 with one line on an unknown group option, a key the composed config lacks (for the group options the
    command line picks), or a missing required key; Hydra reports syntax errors itself."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if any(a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg") for a in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except OverrideParseException:
        return
    picked = []
    for override in overrides:
        key = override.key_or_group
        if key in groups and not override.is_delete():
            discrete = override.is_discrete_sweep()
            values = list(override.sweep_string_iterator()) if discrete else [override.get_value_element_as_str()]
            for value in values:
                if value not in group_options(config_dir, key):
                    fail(program, f"{key}={value!r} is not valid; choose one of "
                                  f"{', '.join(map(repr, group_options(config_dir, key)))}")
            picked.append(f"{key}={values[0]}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        valid = dotted_keys(OmegaConf.to_container(compose(config_name, overrides=picked)))
    GlobalHydra.instance().clear()
    given = {override.key_or_group for override in overrides}
    for key in sorted(given - valid - set(groups)):
        if not key.startswith("hydra"):
            fail(program, unknown_key_message(key, valid, program))
    for key in required:
        if key not in given:
            fail(program, f"{key}= is required; python -m {program} --help says what it takes")


HELP_FLAGS = ("-h", "--help")
HELP_PLACEHOLDERS = {"APP_CONFIG_GROUPS", "CONFIG"}  # what help_text fills in; Hydra's help answers other templates


def help_text(config_dir: Path, config_name: str, args: list[str]) -> str | None:
    """Hydra's --help text for `args` (the primary config's hydra.help.template with the app's config groups and its
    config), composed once, or None where Hydra must answer itself (other flags, or no template with only these
    placeholders). Hydra's own --help copies its whole config repository for every group it lists and loads its
    launcher plugins: a second or more per call."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    flags = [a for a in args if a.startswith("-")]
    if not flags or any(flag not in HELP_FLAGS for flag in flags):
        return None
    # the template as the primary config writes it: composing Hydra's own config would load its launcher plugins
    template = OmegaConf.select(OmegaConf.load(config_dir / f"{config_name}.yaml"), "hydra.help.template")
    if not isinstance(template, str) or set(re.findall(r"\$\{?(\w+)", template)) - HELP_PLACEHOLDERS:
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=[a for a in args if not a.startswith("-")])
    except HydraException:
        return None  # an override the config refuses: Hydra's --help says so
    finally:
        GlobalHydra.instance().clear()
    groups: dict[str, set[str]] = {}
    for path in config_dir.rglob("*.yaml"):
        if path.parent != config_dir:
            groups.setdefault(path.parent.relative_to(config_dir).as_posix(), set()).add(path.stem)
    for group, options in ConfigStore.instance().repo.items():  # aux=<name> of minc_rl.configs; not hydra's own
        if group != "hydra" and isinstance(options, dict):
            groups.setdefault(group, set()).update(name.removesuffix(".yaml") for name in options)
    listing = "".join(f"{group}: {', '.join(sorted(options))}\n" for group, options in sorted(groups.items()))
    return string.Template(template).substitute(APP_CONFIG_GROUPS=listing, CONFIG=OmegaConf.to_yaml(cfg))


def answer_help(config_dir: Path, config_name: str, args: list[str]) -> None:
    """Print --help and exit 0, as Hydra does, where help_text answers it; otherwise return and let Hydra answer."""
    text = help_text(config_dir, config_name, args)
    if text is not None:
        print(text)
        raise SystemExit(0)
