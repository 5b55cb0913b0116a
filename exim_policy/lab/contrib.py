"""The project's contrib/ files (what an admin installs), read by the lab so it runs the same text.

The lab renders its Postfix milter settings and its Rspamd proxy worker from
``contrib/postfix/`` instead of keeping copies: then a test that passes through the lab has
exercised the very lines the admin is told to install.  Only addresses are substituted
(ports are chosen free at run time), through ``substitute_setting``, which insists that the
setting occurs exactly once so a reworded contrib file fails loudly rather than silently
leaving the production address in a lab config.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import LabError, LabUnavailable

#: the repository root in a source checkout (exim_policy/lab/contrib.py -> ../../..)
_REPO = Path(__file__).resolve().parents[2]


def contrib_path(relative: str) -> Path:
    """``contrib/<relative>`` of the source checkout; ``LabUnavailable`` if it is not there."""
    path = _REPO / "contrib" / relative
    if not path.is_file():
        raise LabUnavailable(f"{path} not found: the lab needs a source checkout of "
                             "exim-policy (pip install -e .)")
    return path


def read_contrib(relative: str) -> str:
    return contrib_path(relative).read_text(encoding="utf-8")


def substitute_setting(text: str, pattern: str, replacement: str, *, what: str) -> str:
    """Replace the one non-comment line matching ``pattern`` (a regex, anchored at the line's
    start after optional blanks) with ``replacement``, keeping the indentation."""
    regex = re.compile(rf"^([ \t]*){pattern}[ \t]*$", re.MULTILINE)
    found = regex.findall(text)
    if len(found) != 1:
        raise LabError(f"{what}: expected exactly one line matching {pattern!r}, "
                       f"found {len(found)}")
    return regex.sub(lambda m: m.group(1) + replacement, text)
