"""One way to change any flipray config (pretext, downstream tasks, synthesis): `--set a.b=value` and YAML files.

    flipray train-pretext --config demo --set model.audio_width=32 --set train.lr=3e-3
    python -m jobs.localize --config-file best.yaml --set lr=3e-4
    flipray synth --out data/s --clips 40 --seed 0 --set rt60_s=[0.2,0.4]

Type rules (the same for every config): a `--set` value is read as a YAML scalar/list unless the field is a string;
bool fields take true/false only; int fields take integers (7e6 and 7000000.0 are fine, 2.5 is not); float fields
take any number; tuple fields take a list of the same length; str fields take strings; a section (nested
dataclass) takes a mapping. A wrong key names itself and the closest real one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import sys
from pathlib import Path

import yaml


class UsageError(ValueError):
    """What the user asked for cannot be done as asked: a config key, value, preset or file, a data root, a run name.
    The user gets its message as one line and exit 2 (`user_errors`), not a traceback."""


@contextlib.contextmanager
def user_errors(prog: str):
    """Around a command's main: a UsageError becomes `PROG: message` on stderr and exit 2 (a usage error, as
    argparse's); a full disk becomes one line and exit 1 (a failure while running); anything else keeps its
    traceback."""
    try:
        yield
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        why = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        where = f" writing {e.filename}" if e.filename else ""
        print(f"{prog}: {why}{where}; what was finished is kept (files are replaced only when complete): free some "
              f"space and run the same command again", file=sys.stderr)
        raise SystemExit(1) from None


def keys(cfg, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) dataclass, e.g. ["data.root", ..., "train.lr"]."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def unknown_key(cfg, key: str) -> UsageError:
    close = difflib.get_close_matches(key, keys(cfg), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; keys are {', '.join(keys(cfg))}"
    return UsageError(f"unknown key {key}{hint}")


def coerce(key: str, current, value):
    """`value` converted to the type of `current` (the field's present value) by the rules above."""
    def bad(expected: str):
        return UsageError(f"{key} must be {expected}, got {value!r}")
    if isinstance(value, str) and not isinstance(current, str) and current is not None:
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value  # not YAML ("[1"): the type check below names what was expected
        if isinstance(parsed, str) and isinstance(current, (int, float)) and not isinstance(current, bool):
            try:
                parsed = float(parsed)  # YAML 1.1 reads 7e6 as a string
            except ValueError:
                pass
        value = parsed
    if current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        return value
    if isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise bad(f"a list of {len(current)} values")
        return tuple(coerce(f"{key}[{i}]", c, v) for i, (c, v) in enumerate(zip(current, value)))
    if isinstance(current, list):
        if not isinstance(value, list):
            raise bad("a list")
        return value
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    return value


def set_key(cfg, key: str, value) -> None:
    """Set the dotted `key` of a (nested) dataclass config in place, by the type rules above."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        if part not in names:
            raise unknown_key(cfg, key)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    current = getattr(obj, parts[-1])
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise UsageError(f"{key} is a section: give a mapping of its keys, got {value!r}")
        for k, v in value.items():
            set_key(cfg, f"{key}.{k}", v)
        return
    setattr(obj, parts[-1], coerce(key, current, value))


def apply(cfg, overrides: dict | list[str] | None):
    """Apply {"a.b": v} / {"a": {"b": v}} (YAML) or ["a.b=v", ...] (`--set`) to `cfg` in place; returns cfg."""
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = overrides.items()
    else:
        items = []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"override {item!r} must look like key=value (e.g. train.lr=0.01)")
            items.append((key.strip(), value))
    for key, value in items:
        set_key(cfg, key, value)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """A YAML file of config keys (nested sections or dotted keys): a mapping, or an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def add_arguments(parser, what: str = "config") -> None:
    """`--config-file F.yaml` (repeatable) and `--set KEY=VALUE` (repeatable) on an argparse parser."""
    parser.add_argument("--config-file", action="append", default=[], metavar="F.yaml",
                        help=f"{what} keys from a YAML file (applied in order, before --set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"one {what} key, e.g. --set a.b=1 (flipray/overrides.py has the type rules)")


def from_args(cfg, args):
    """Apply an argparse namespace's --config-file files, then its --set items, to `cfg`; returns cfg."""
    for path in getattr(args, "config_file", None) or []:
        apply(cfg, read_yaml(path))
    return apply(cfg, getattr(args, "set", None))


def config_from_args(cls, args, parser, flags: dict[str, str]):
    """A `cls()` config from a command line: --config-file files, then the command's own flags that were changed
    from their defaults ({argparse dest: config key}), then --set; built again through `cls(...)` so that the
    dataclass's own checks (__post_init__) run."""
    cfg = cls()
    for path in args.config_file:
        apply(cfg, read_yaml(path))
    apply(cfg, {key: getattr(args, dest) for dest, key in flags.items()
                if getattr(args, dest) != parser.get_default(dest)})
    apply(cfg, args.set)
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
