"""Command-line conventions of every script here: `--help` shows each flag's default, a bad value
gets one line naming the flag (and a non-zero exit) before any work starts, and fractions such as
2/255 are read wherever a number is. ε has its own reader, `ball.parse_eps`. Paths that a run or an
evaluation records (data, run directory, checkpoint) are written relative to the repository when
they lie inside it, so that a clone elsewhere finds them (`record_path`, `recorded_path`)."""
import argparse
import os
from fractions import Fraction


ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository


def record_path(path):
    """`path` as a run or report records it: relative to the repository root when it lies inside
    the repository, else absolute (None stays None)."""
    if path is None:
        return None
    absolute = os.path.abspath(path)
    inside = os.path.commonpath([absolute, ROOT]) == ROOT
    return os.path.relpath(absolute, ROOT) if inside else absolute


def recorded_path(text):
    """A path read from a run or report: an absolute one as it is (older records, or outside the
    repository), a relative one joined to the repository root (None stays None)."""
    return text if text is None or os.path.isabs(text) else os.path.normpath(os.path.join(ROOT, text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help (a flag whose
    default is None says in its help what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (SystemExit("script.py: error: ..."), exit status 1) instead of
    the usage block, as the scripts' own checks give, and the defaults shown in --help. `script` is
    the script's __file__."""

    def __init__(self, description, script):
        super().__init__(description=description, prog=os.path.basename(script), formatter_class=HelpFormatter)

    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message}")


def number(text):
    """A float from the command line; fractions such as 2/255 are accepted."""
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def boolean(text):
    """true/false (or yes/no, 1/0) from the command line."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"not true or false: {text!r}")
    return value


def require(condition, message):
    """Raise ValueError(message) unless `condition`: the scripts' range checks, one line each."""
    if not condition:
        raise ValueError(message)


def fractions_of_training(text):
    """'0.8,0.88' -> [0.8, 0.88]: increasing fractions of training in (0, 1), or an empty list for ''."""
    try:
        values = [float(Fraction(v)) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read {text!r}: write fractions of training such as 0.5,0.75") from None
    require(all(0 < v < 1 for v in values) and values == sorted(values),
            f"{text!r}: the fractions must increase and lie between 0 and 1, e.g. 0.5,0.75")
    return values
