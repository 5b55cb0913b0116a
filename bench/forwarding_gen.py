#!/usr/bin/env python3
"""Generate a synthetic Exim alias set (lsearch) for the forwarding-map benchmark and tests.

    python bench/forwarding_gen.py --aliases 1000000 --edges 2000000 --seed 1 --out /tmp/virtual
    python bench/forwarding_gen.py --shape cycle --aliases 1000000 --edges 2000000 --out /tmp/v

Writes ``OUT`` (an lsearch file with ``--aliases`` keys and ``--edges`` targets in all; the
``sources`` shape writes ``OUT``, ``OUT.1``, ``OUT.2`` and ``OUT.3``), ``OUT.domains`` (the
local domains, one per line, for ``local_domains_file``) and prints the sources as JSON
(``[{"path": ..., "domain": ...}]``, for a configuration's ``[[forwarding.sources]]``).

Shapes (``--shape``):

- ``gen`` (the default): keys ``u<i>@d<k>.example``; every key gets ``edges/aliases``
  targets on average (Poisson-ish spread), each target one of: another alias (mostly the
  next one, so long chains form; sometimes a random one, so fan-in, fan-out and cycles
  form; sometimes a previous one, so short cycles form), an external address, a local
  mailbox (a local address that is a key nowhere), or an Exim special (pipe, file,
  ``:blackhole:``).  About one domain in ten gets a ``*@domain`` wildcard.  Some entries
  are spread over continuation lines, some use upper case, and comment lines are
  sprinkled in.
- ``cycle``: a random alias graph in which nearly every address ends outside: the first
  target of each key is the next one along one random cycle through all keys, the others
  are random keys, and about one target in a hundred is external (so the cycle has exits
  everywhere, and a search must cross most of the graph).
- ``crlf``: ``gen`` with CRLF line ends.
- ``sources``: ``gen`` cut into four files of consecutive entries (four lsearch sources
  whose chains cross from one to the other).
- ``bare``: an ``/etc/aliases``-style file for one domain (the source's ``domain`` is
  set): keys and local targets are bare local parts, external targets full addresses.

The same seed always gives the same files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

SHAPES = ("gen", "cycle", "crlf", "sources", "bare")
SPECIALS = (":blackhole:", "|/usr/local/bin/ticket", "/var/mail/archive")


def _counts(rng: random.Random, keys: int, edges: int, fan_out: bool):
    """The number of targets of each key: ``edges`` in all, a few keys with 20 more."""
    debt = 0  # extra targets handed out to fan-out entries, paid back one per entry
    rnd = rng.random
    for i in range(keys):
        base = (i + 1) * edges // keys - i * edges // keys
        if fan_out and i < keys * 0.9 and rnd() < 0.02:
            k = base + 20
            debt += 20
        elif debt and base:
            k = base - 1
            debt -= 1
        else:
            k = base
        if i == keys - 1:
            k = base - debt  # pay back whatever is left, so the total is exact
        yield k


def generate(aliases: int, edges: int, seed: int, out, domains_out,
             n_domains: int = 0, *, bare: bool = False, newline: str = "\n") -> None:
    """The ``gen`` shape (``bare``: the ``bare`` one, ``newline``: the line end): the alias
    file to ``out``, the local domains to ``domains_out``; ``n_domains`` 0 means one local
    domain per 5000 aliases (``bare``: one)."""
    rng = random.Random(seed)
    n_domains = 1 if bare else n_domains or max(1, aliases // 5000)
    domains = [f"d{k}.example" for k in range(n_domains)]
    for d in domains:
        domains_out.write(f"{d}\n")
    wildcard_domains = [] if bare else [d for i, d in enumerate(domains) if i % 10 == 3]
    keys = aliases - len(wildcard_domains) - bare  # (bare: a "*" key)
    if keys < 1:
        raise SystemExit("--aliases too small for the number of wildcard domains")
    rnd = rng.random
    randrange = rng.randrange
    write = out.write
    write(f"# synthetic alias set: {aliases} aliases, {edges} targets, seed {seed}{newline}")

    def alias(j: int) -> str:
        return f"u{j}" if bare else f"u{j}@{domains[j % n_domains]}"

    def target(i: int) -> str:
        r = rnd()
        if r < 0.30:  # chain to the next alias
            return alias(i + 1 if i + 1 < keys else 0)
        if r < 0.40:  # anywhere: fan-in and long cycles
            return alias(randrange(keys))
        if r < 0.43:  # back a little: short cycles
            return alias(max(0, i - randrange(1, 4)))
        if r < 0.70:
            return f"x{randrange(10**9)}@mail{randrange(50)}.example.org"
        if r < 0.98:
            return f"m{randrange(10**9)}" if bare else \
                f"m{randrange(10**9)}@{domains[randrange(n_domains)]}"
        return SPECIALS[randrange(3)]

    for i, k in enumerate(_counts(rng, keys, edges - bare, edges / keys >= 1)):
        if i % 997 == 0:
            write(f"# a comment line{newline}")
        key = alias(i)
        if i % 101 == 0:
            key = key.upper()
        targets = [target(i) for _ in range(k)]
        if i % 53 == 0 and len(targets) > 1:  # continuation lines
            write(f"{key}: {targets[0]},{newline}")
            for t in targets[1:-1]:
                write(f"    {t},{newline}")
            write(f"    {targets[-1]}{newline}")
        else:
            write(f"{key}: {', '.join(targets)}{newline}")
    for d in wildcard_domains:
        write(f"*@{d}: catchall@{d.replace('.example', '')}.example.org{newline}")
    if bare:
        write(f"*: postmaster{newline}")


def generate_cycle(aliases: int, edges: int, seed: int, out, domains_out,
                   n_domains: int = 0) -> None:
    """The ``cycle`` shape (see the module docstring)."""
    rng = random.Random(seed)
    n_domains = n_domains or max(1, aliases // 5000)
    domains = [f"d{k}.example" for k in range(n_domains)]
    for d in domains:
        domains_out.write(f"{d}\n")
    order = list(range(aliases))
    rng.shuffle(order)
    after = [0] * aliases  # the next key along the cycle
    for a, b in zip(order, order[1:] + order[:1], strict=False):
        after[a] = b
    rnd, randrange, write = rng.random, rng.randrange, out.write
    write(f"# random alias graph: {aliases} aliases, {edges} targets, seed {seed}\n")
    for i, k in enumerate(_counts(rng, aliases, edges, edges / aliases >= 1)):
        targets = []
        for n in range(k):
            j = after[i] if n == 0 else randrange(aliases)
            if rnd() < 0.01:
                targets.append(f"x{randrange(10**9)}@mail{randrange(50)}.example.org")
            else:
                targets.append(f"u{j}@{domains[j % n_domains]}")
        write(f"u{i}@{domains[i % n_domains]}: {', '.join(targets)}\n")


def write_shape(shape: str, aliases: int, edges: int, seed: int, out: str,
                n_domains: int = 0) -> list[dict]:
    """Write the files of ``shape``; returns the sources (``path``, ``domain``)."""
    with open(out, "w", newline="") as fh, open(f"{out}.domains", "w") as domains_out:
        if shape == "cycle":
            generate_cycle(aliases, edges, seed, fh, domains_out, n_domains)
        else:
            generate(aliases, edges, seed, fh, domains_out, n_domains, bare=shape == "bare",
                     newline="\r\n" if shape == "crlf" else "\n")
    if shape == "bare":
        return [{"path": out, "domain": "d0.example"}]
    if shape != "sources":
        return [{"path": out, "domain": ""}]
    with open(out) as fh:
        lines = fh.readlines()
    paths = [out] + [f"{out}.{k}" for k in range(1, 4)]
    cut = 0
    for k, path in enumerate(paths):
        end = len(lines) if k == 3 else len(lines) * (k + 1) // 4
        while end < len(lines) and lines[end][:1].isspace():
            end += 1  # (not between an entry and its continuation lines)
        with open(path, "w") as fh:
            fh.writelines(lines[cut:end])
        cut = end
    return [{"path": path, "domain": ""} for path in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aliases", type=int, required=True)
    parser.add_argument("--edges", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=SHAPES, default="gen")
    parser.add_argument("--domains", type=int, default=0,
                        help="number of local domains (default: one per 5000 aliases; every "
                        "tenth, starting with the fourth, gets a *@domain wildcard)")
    args = parser.parse_args(argv)
    if args.aliases < 1 or args.edges < 0 or args.domains < 0:
        parser.error("--aliases must be >= 1, --edges and --domains >= 0")
    print(json.dumps(write_shape(args.shape, args.aliases, args.edges, args.seed, args.out,
                                 args.domains)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
