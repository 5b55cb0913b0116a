#!/usr/bin/env python3
"""Generate a synthetic Exim alias set (lsearch) for the forwarding-map benchmark and tests.

    python bench/forwarding_gen.py --aliases 1000000 --edges 2000000 --seed 1 --out /tmp/virtual

Writes ``OUT`` (an lsearch file with ``--aliases`` keys and ``--edges`` targets in all) and
``OUT.domains`` (the local domains, one per line, for ``local_domains_file``).

Shape: keys ``u<i>@d<k>.example``; every key gets ``edges/aliases`` targets on average
(Poisson-ish spread), each target one of: another alias (mostly the next one, so long
chains form; sometimes a random one, so fan-in, fan-out and cycles form; sometimes a
previous one, so short cycles form), an external address, a local mailbox (a local address
that is a key nowhere), or an Exim special (pipe, file, ``:blackhole:``).  About one domain
in ten gets a ``*@domain`` wildcard.  Some entries are spread over continuation lines, some
use upper case, and comment lines are sprinkled in, so the parser's slower paths are
exercised too.  The same seed always gives the same file.
"""
from __future__ import annotations

import argparse
import random
import sys


def generate(aliases: int, edges: int, seed: int, out, domains_out,
             n_domains: int = 0) -> None:
    """Write the alias file to ``out`` and the local domains to ``domains_out``;
    ``n_domains`` 0 means one local domain per 5000 aliases."""
    rng = random.Random(seed)
    n_domains = n_domains or max(1, aliases // 5000)
    domains = [f"d{k}.example" for k in range(n_domains)]
    for d in domains:
        domains_out.write(f"{d}\n")
    wildcard_domains = [d for i, d in enumerate(domains) if i % 10 == 3]
    keys = aliases - len(wildcard_domains)
    if keys < 1:
        raise SystemExit("--aliases too small for the number of wildcard domains")
    mean = edges / keys
    rnd = rng.random
    randrange = rng.randrange
    specials = (":blackhole:", "|/usr/local/bin/ticket", "/var/mail/archive")
    write = out.write
    write(f"# synthetic alias set: {aliases} aliases, {edges} targets, seed {seed}\n")

    def target(i: int) -> str:
        r = rnd()
        if r < 0.30:  # chain to the next alias
            j = i + 1 if i + 1 < keys else 0
            return f"u{j}@{domains[j % n_domains]}"
        if r < 0.40:  # anywhere: fan-in and long cycles
            j = randrange(keys)
            return f"u{j}@{domains[j % n_domains]}"
        if r < 0.43:  # back a little: short cycles
            j = max(0, i - randrange(1, 4))
            return f"u{j}@{domains[j % n_domains]}"
        if r < 0.70:
            return f"x{randrange(10**9)}@mail{randrange(50)}.example.org"
        if r < 0.98:
            return f"m{randrange(10**9)}@{domains[randrange(n_domains)]}"
        return specials[randrange(3)]

    debt = 0  # extra targets handed out to fan-out entries, paid back one per entry
    fan_out = mean >= 1
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
        if i % 997 == 0:
            write("# a comment line\n")
        key = f"u{i}@{domains[i % n_domains]}"
        if i % 101 == 0:
            key = key.upper()
        targets = [target(i) for _ in range(k)]
        if i % 53 == 0 and len(targets) > 1:  # continuation lines
            write(f"{key}: {targets[0]},\n")
            for t in targets[1:-1]:
                write(f"    {t},\n")
            write(f"    {targets[-1]}\n")
        else:
            write(f"{key}: {', '.join(targets)}\n")
    for d in wildcard_domains:
        write(f"*@{d}: catchall@{d.replace('.example', '')}.example.org\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aliases", type=int, required=True)
    parser.add_argument("--edges", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--domains", type=int, default=0,
                        help="number of local domains (default: one per 5000 aliases; every "
                        "tenth, starting with the fourth, gets a *@domain wildcard)")
    args = parser.parse_args(argv)
    if args.aliases < 1 or args.edges < 0 or args.domains < 0:
        parser.error("--aliases must be >= 1, --edges and --domains >= 0")
    with open(args.out, "w") as out, open(f"{args.out}.domains", "w") as domains_out:
        generate(args.aliases, args.edges, args.seed, out, domains_out, args.domains)
    return 0


if __name__ == "__main__":
    sys.exit(main())
