"""``exim-policy files``: the admin files that ship with exim-policy, wherever pip put them.

``files [PATH]``             lists them (relative paths, one per line) after a ``#`` line
                             saying where they are; PATH (a file or a directory such as
                             ``exim`` or ``contrib/systemd``) lists only those.
``files --copy DIR [PATH]``  copies them into DIR (created when missing), keeping their
                             relative paths; with PATH only those, relative to PATH, so
                             ``--copy /etc/exim4/exim-policy exim`` puts main.conf right
                             into /etc/exim4/exim-policy. A file already there with other
                             content is kept and named on stderr, and the exit status is 1
                             (``--force`` overwrites it): an admin's edit is never lost
                             silently. Identical files are left alone.
``files --show PATH``        prints one file.

Exit status 0; 1 when --copy kept differing files; 2 on an unknown path or an I/O error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

NAME = "files"
HELP = "list, copy or print the shipped admin files (exim/ configuration, contrib/ examples)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default="", metavar="PATH",
                        help="only this file or directory (e.g. exim, contrib/systemd)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--copy", metavar="DIR",
                        help="copy the files into DIR (created if missing); with PATH, "
                        "relative to PATH")
    action.add_argument("--show", metavar="FILE", help="print one file, e.g. "
                        "contrib/config.example.toml")
    parser.add_argument("--force", action="store_true",
                        help="with --copy: overwrite files in DIR whose content differs")


def run(args: argparse.Namespace) -> int:
    from ..admin_files import AdminFilesError, locate, normalize

    if args.force and not args.copy:
        return _error("--force goes with --copy")
    if args.show and args.path:
        return _error("--show takes one FILE, not PATH as well")
    try:
        found = locate()
        if args.show:
            return _show(found, args.show)
        chosen = found.select(args.path)
        if args.copy:
            return _copy(found.root, chosen, normalize(args.path), Path(args.copy), args.force)
    except AdminFilesError as exc:
        return _error(str(exc))
    print(f"# {found.root} ({found.origin}): {len(chosen)} file{'' if len(chosen) == 1 else 's'}")
    for relative in chosen:
        print(relative)
    return 0


def _show(found, relative: str) -> int:
    from ..admin_files import normalize

    key = normalize(relative)
    if found.select(relative) != (key,):  # unknown: AdminFilesError
        return _error(f"{relative!r} is a directory; --show prints one file "
                      f"(exim-policy files {key} lists it)")
    try:
        data = (found.root / key).read_bytes()
    except OSError as exc:
        return _error(f"cannot read {found.root / key}: {exc.strerror}")
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _copy(root: Path, chosen: tuple[str, ...], base: str, target: Path, force: bool) -> int:
    """Copy ``chosen`` (paths under ``root``) into ``target``, each relative to ``base``."""
    import shutil

    new = same = replaced = kept = 0
    try:
        for relative in chosen:
            source = root / relative
            dest = target / _below(relative, base)
            data = source.read_bytes()
            if dest.is_file():
                if dest.read_bytes() == data:
                    same += 1
                    continue
                if not force:
                    print(f"exim-policy files: {dest} differs from the shipped file; kept "
                          "(--force overwrites it)", file=sys.stderr)
                    kept += 1
                    continue
                dest.write_bytes(data)  # keeps the mode and owner the admin gave it
                replaced += 1
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)  # refuses a directory in the way
            shutil.copymode(source, dest)
            new += 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"cannot copy into {target}: {where}{exc.strerror or exc}")
    print(f"{target}: {new} copied, {same} unchanged, {replaced} overwritten, {kept} kept")
    return 1 if kept else 0


def _below(relative: str, base: str) -> PurePosixPath:
    """``relative`` under ``base``: ``exim/main.conf`` below ``exim`` is ``main.conf``; a
    single file below itself is its name."""
    path = PurePosixPath(relative)
    if not base:
        return path
    if relative == base:
        return PurePosixPath(path.name)
    return path.relative_to(base)


def _error(message: str) -> int:
    print(f"exim-policy files: {message}", file=sys.stderr)
    return 2
