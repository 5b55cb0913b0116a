"""The project's contrib/ files (what an admin installs), read by the lab so it runs the same text.

They are found where ``exim-policy files`` finds them (exim_policy/admin_files.py): the
package data of an installed exim-policy, or the source checkout.

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

from ..admin_files import AdminFilesError, locate
from .errors import LabError, LabUnavailable


def contrib_path(relative: str) -> Path:
    """The shipped ``contrib/<relative>``; ``LabUnavailable`` if it is not there."""
    try:
        return locate().path(f"contrib/{relative}")
    except AdminFilesError as exc:
        raise LabUnavailable(str(exc)) from None


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
