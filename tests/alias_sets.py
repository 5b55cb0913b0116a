"""Synthetic alias sets for the forwarding tests, from bench/forwarding_gen.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(directory: Path, seed: int, aliases: int, targets: int, domains: int) -> Path:
    """Write ``directory/virtual`` (the alias file, which is returned) and
    ``directory/domains`` (its local domains, one per line)."""
    spec = importlib.util.spec_from_file_location("forwarding_gen",
                                                  ROOT / "bench" / "forwarding_gen.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path = directory / "virtual"
    with open(path, "w") as out, open(directory / "domains", "w") as domains_out:
        gen.generate(aliases, targets, seed, out, domains_out, domains)
    return path


def local_domains(directory: Path) -> frozenset[str]:
    """The local domains that :func:`generate` wrote."""
    return frozenset((directory / "domains").read_text().split())


def entries(source) -> list[tuple[str, list[str], int]]:
    """A source's entries as ``(key, sorted targets, line)``: the exact keys in line (row)
    order, then the wildcards (the targets of a ``detail`` source: ends included)."""
    grouped: dict[int, list[str]] = {}
    for targets, owners in source.chunks:
        if isinstance(targets, str):
            targets = targets.split(",") if targets else []
        for owner, target in zip(owners, targets, strict=False):
            grouped.setdefault(owner, []).append(target)
    for owner, target in zip(source.end_owners, source.end_targets, strict=False):
        grouped.setdefault(owner, []).append(target)
    out = [(key, sorted(grouped.get(i, [])), i + 1) for i, key in enumerate(source.keys) if key]
    out.extend((key, sorted(targets), line) for key, targets, line in source.wildcards)
    return out
