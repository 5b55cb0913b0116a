"""Where the admin files are: the Exim configuration (exim/) and the contrib/ files an admin
installs (example config, systemd unit, Haraka, Postfix and Rspamd snippets).

The source tree keeps one copy of them, at its top; the wheel carries them inside the
package, as ``exim_policy/share/`` (setup.py copies them there at build time), so that an
installed exim-policy finds them through ``importlib.resources``. ``locate()`` prefers that
package data and falls back to the source checkout (an editable install, or running from
the repository), where ``exim_policy/share/`` does not exist.

setup.py loads this module by path, before the package is installed: it imports nothing
but the standard library.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: what ships, relative to the source tree's root: directories whole, or single files.
#: Not shipped: contrib/setup*.sh, contrib/test.sh, contrib/demo.sh (they prepare a
#: checkout on a lab machine)
SHIPPED = (
    "exim",
    "contrib/config.example.toml",
    "contrib/systemd",
    "contrib/haraka",
    "contrib/postfix",
    "contrib/rspamd",
)
#: the package directory that holds the shipped files in a built wheel
PACKAGE_DIR = "share"
#: never shipped, wherever they are
_SKIPPED_DIRS = frozenset({"__pycache__"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo", "~")


class AdminFilesError(LookupError):
    """The admin files are not there, or a path names none of them."""


def shipped_files(root: Path) -> tuple[str, ...]:
    """The relative POSIX paths of the shipped files under ``root`` (a source tree), sorted.

    Raises ``AdminFilesError`` when an entry of ``SHIPPED`` is missing: a build or a
    checkout without it would silently lack what the README tells the admin to install.
    """
    found: list[str] = []
    for entry in SHIPPED:
        path = root / entry
        if path.is_file():
            found.append(entry)
        elif path.is_dir():
            found.extend(_walk(root, path))
        else:
            raise AdminFilesError(f"{path} not found")
    return tuple(sorted(found))


def _walk(root: Path, top: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in filenames:
            if not name.endswith(_SKIPPED_SUFFIXES):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return out


@dataclass(frozen=True)
class AdminFiles:
    """The admin files found: ``root`` holds ``exim/`` and ``contrib/``."""

    root: Path
    #: True: the package data of an installed exim-policy; False: a source checkout
    installed: bool
    #: relative POSIX paths, sorted
    files: tuple[str, ...]

    @property
    def origin(self) -> str:
        return "installed package data" if self.installed else "source checkout"

    def select(self, relative: str) -> tuple[str, ...]:
        """The files at or under ``relative`` (a shipped file or a directory of them)."""
        key = normalize(relative)
        if key == "":
            return self.files
        chosen = tuple(f for f in self.files if f == key or f.startswith(key + "/"))
        if not chosen:
            raise AdminFilesError(f"{relative!r} is none of the shipped files "
                                  "(exim-policy files lists them)")
        return chosen

    def path(self, relative: str) -> Path:
        """The filesystem path of a shipped file or directory."""
        self.select(relative)
        return self.root / normalize(relative)


def normalize(relative: str) -> str:
    """``relative`` as a key of ``AdminFiles.files``: ``./exim/`` -> ``exim``; ``""`` for
    the root. An absolute path or one with ``..`` is an ``AdminFilesError``."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise AdminFilesError(f"{relative!r}: expected a path relative to the shipped files, "
                              "such as exim/main.conf")
    text = pure.as_posix()
    return "" if text == "." else text


def locate() -> AdminFiles:
    """The installed package data when present, else the source checkout this module runs
    from; ``AdminFilesError`` when neither is there."""
    installed = _package_data()
    if installed is not None:
        return AdminFiles(installed, True, tuple(sorted(_walk(installed, installed))))
    checkout = Path(__file__).resolve().parents[1]
    try:
        files = shipped_files(checkout)
    except AdminFilesError as exc:
        raise AdminFilesError(
            f"the admin files (exim/, contrib/) are neither installed with the package nor "
            f"in a source checkout ({exc}); reinstall exim-policy from a wheel or a "
            f"checkout (pip install /path/to/exim-policy)") from None
    return AdminFiles(checkout, False, files)


def _package_data() -> Path | None:
    """``exim_policy/share`` as a directory on disk, or None (a source checkout; a zipped
    package, whose files Exim could not read either)."""
    from importlib import resources

    data = resources.files(__package__) / PACKAGE_DIR
    if isinstance(data, Path) and data.is_dir():
        return data
    return None
