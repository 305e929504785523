"""
Poor Man's Configurator (nanoGPT's idiom), with checks on every override.

A script defines its config as plain globals, lists them in `config_keys`, then runs this file:

    batch_size = 12
    learning_rate = 6e-4
    compile = True
    config_keys = [k for k, v in globals().items() if not k.startswith('_')
                   and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}  # e.g. for logging

Build the path from __file__ as above so the script runs from any cwd (nanoGPT's bare
open('configurator.py') only works from the repo root). Exec'd into a script that runs as
__main__, this file reads sys.argv[1:] left to right:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

- `file.py` (no leading -): a Python config file, exec'd into the script's globals; looked up
  from the cwd, then from the script's folder. Like nanoGPT, a config file may set any name,
  but setting one that is not a config key prints a warning naming the closest key: that is
  nearly always a typo which would otherwise silently do nothing. A config key it sets must have its
  default's type, as on the command line (a float key takes an int too, a tuple or list key either):
  a value of another type is an error naming the key, the file and the type expected.
- `--key=value`: overrides a config key, checked against the type of its current value:
    bool   True/False/true/false/1/0        int    an integer ("5000")
    float  any finite int or float ("3", "1e-4"; never nan or inf)    str    taken literally
    None   a Python literal (ast.literal_eval), else the text itself
    tuple/list  a literal ("(0.9,0.95)", "0.9,0.95", "[1,2]"), converted to the default's type
- `--help` / `-h`: print the config keys with their values (after any config files), exit 0.

NaN and inf are never config values (not for float keys, nor inside a tuple, list or dict).
A mistake (unknown key, bad value, missing or broken config file, a config file value of the wrong
type) prints one line to stderr and exits with status 2 before the script does anything else, e.g.
    error: unknown config key 'lerning_rate' (did you mean: learning_rate?)

The same logic can be imported; importing does not read sys.argv:

    from configurator import apply_overrides
    config = apply_overrides(globals(), sys.argv[1:])   # any dict of defaults works too

The config keys are `allowed_keys` when given, else the dict's `config_keys` list when it has
one, else its public int/float/bool/str/tuple/list/None values. apply_overrides returns
{key: value} for them. Exec'd into a module that is not __main__ this file does nothing.
"""
import ast
import difflib
import math
import os
import runpy
import sys

_CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))
_BOOLS = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}
_MISSING = object()


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_keys(globals_dict, allowed_keys):
    if allowed_keys is None:
        allowed_keys = globals_dict.get("config_keys")
    if allowed_keys is None:
        allowed_keys = [k for k, v in globals_dict.items()
                        if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)]
    return list(allowed_keys)


def _did_you_mean(name, keys):
    matches = difflib.get_close_matches(name, keys, n=3)
    return f"did you mean: {', '.join(matches)}?" if matches else "see --help for the keys"


def _literal(text, fallback=None):
    try:
        return ast.literal_eval(text)
    except Exception:  # literal_eval raises several kinds on malformed input
        return fallback


def _convert(kind, text):
    try:
        return kind(text)
    except ValueError:
        return None


def _non_finite(value):
    """Whether `value` is or holds (in a tuple, list or dict) a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _expected(default):
    """What a key with this default takes, in words."""
    if default is None:
        return "a value without nan or inf"
    if isinstance(default, bool):
        return "bool (True/False/true/false/1/0)"
    if isinstance(default, float):
        return "a finite float"
    if isinstance(default, (tuple, list)):
        return "a tuple or list without nan or inf"
    if isinstance(default, dict):
        return "a dict without nan or inf"
    return type(default).__name__


def _typed(value, default):
    """`value` (a Python object) as the type of `default`, or None when it does not have that type."""
    if default is None:
        return value
    if isinstance(default, bool):  # before int: bool is a subclass of int
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):  # True is not a number here
        return None
    if isinstance(default, float):
        try:
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        except OverflowError:  # an int past float's range
            return None
    if isinstance(default, (tuple, list)):
        return type(default)(value) if isinstance(value, (tuple, list)) else None
    return value if isinstance(value, type(default)) else None


def _parse_value(key, text, default):
    """`text` as the type of `default`, or a one-line error naming what was expected."""
    if isinstance(default, str):
        return text
    if default is None:  # no type to check against
        value = _literal(text, fallback=text)
    elif isinstance(default, bool):  # before int: bool is a subclass of int
        value = _BOOLS.get(text)
    elif isinstance(default, int):
        value = _convert(int, text)
    elif isinstance(default, float):
        value = _convert(float, text)
        value = value if value is None or math.isfinite(value) else None
    else:
        value = _typed(_literal(text), default)
    if value is None and default is not None or _non_finite(value):
        _fail(f"--{key} expects {_expected(default)}, got {text!r}")
    return value


def _find_config_file(name, globals_dict):
    candidates = [name]
    script = globals_dict.get("__file__")
    if script and not os.path.isabs(name):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(script)), name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    _fail(f"config file {name!r} not found")


def _load_config_file(name, globals_dict, keys, defaults):
    # runpy rather than exec(compile(...)): exec'd into a script, these functions see its globals,
    # where a config key may shadow a builtin (nanoGPT's `compile = True`)
    path = _find_config_file(name, globals_dict)
    try:
        result = runpy.run_path(path, init_globals=globals_dict)
    except Exception as e:  # the file's own error, whatever it is, in one line
        _fail(f"config file {name!r} failed: {e.__class__.__name__}: {' '.join(str(e).split())[:300]}")
    changed = {k: v for k, v in result.items()
               if not k.startswith("__") and globals_dict.get(k, _MISSING) is not v}
    for k, v in changed.items():
        if k not in keys and not k.startswith("_") and isinstance(v, _CONFIG_TYPES):
            print(f"warning: {name} sets {k!r}, which is not a config key ({_did_you_mean(k, keys)})",
                  file=sys.stderr)
        if k in keys:
            changed[k] = _file_value(k, v, defaults.get(k), name)
    globals_dict.update(changed)


def _file_value(key, value, default, name):
    """A config file's value for `key`, checked against the type of the key's default like a command-line value."""
    typed = _typed(value, default)
    if typed is None and default is not None or _non_finite(typed):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        _fail(f"config file {name!r} sets {key} = {shown} ({type(value).__name__}): "
              f"{key} expects {_expected(default)}")
    return typed


def _print_help(globals_dict, keys):
    print(f"usage: python {sys.argv[0]} [config_file.py ...] [--key=value ...]")
    print("config keys and defaults:")
    for k in keys:
        print(f"  {k} = {globals_dict.get(k)!r}")


def apply_overrides(globals_dict, argv, allowed_keys=None):
    """Apply config files and --key=value overrides in `argv` to `globals_dict`; return the config."""
    keys = _config_keys(globals_dict, allowed_keys)
    defaults = {k: globals_dict.get(k) for k in keys}  # the types every value is checked against
    if "--help" in argv or "-h" in argv:
        for arg in argv:
            if not arg.startswith("-"):
                _load_config_file(arg, globals_dict, keys, defaults)
        _print_help(globals_dict, keys)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("-"):
            _load_config_file(arg, globals_dict, keys, defaults)
            continue
        if not arg.startswith("--"):
            _fail(f"unknown option {arg!r}: overrides are written --key=value")
        key, has_value, text = arg[2:].partition("=")
        if key not in keys:
            _fail(f"unknown config key {key!r} ({_did_you_mean(key, keys)})")
        if not has_value:
            _fail(f"{arg!r} has no value: write --{key}=VALUE")
        globals_dict[key] = _parse_value(key, text, defaults[key])
    return {k: globals_dict.get(k) for k in keys}


if __name__ == "__main__":  # exec'd into a script run as a program: apply its command line
    apply_overrides(globals(), sys.argv[1:])
