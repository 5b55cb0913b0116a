"""The builder against the real thing: Exim 4.96 routes the same alias file (``exim -bt``,
address testing: no daemon, no delivery, no network) and must forward exactly the
addresses the graph says forward.

The Exim configuration is the one the builder models: a redirect router over the alias
file with ``lsearch*@`` (exact key, then ``*@domain``, then ``*``) and
``qualify_preserve_domain``, then local delivery for local domains and a ``manualroute``
to 127.0.0.1 for everything else ("router = remote" in the output = forwarded).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exim_policy.forwarding import lsearch
from exim_policy.forwarding.graph import ForwardingGraph

import alias_sets

pytestmark = pytest.mark.real  # the real Exim (exim -bt)

EXIM_CONF = """\
primary_hostname = host.test
domainlist local_domains = {domains}
host_lookup_order =
keep_environment =
exim_user = root
exim_group = root
never_users =
spool_directory = {dir}/spool
log_file_path = {dir}/%slog

begin routers
aliases:
  driver = redirect
  domains = +local_domains
  data = ${{lookup{{$local_part@$domain}}lsearch*@{{{aliases}}}}}
  qualify_preserve_domain
  allow_fail
  allow_defer
  file_transport = t
  pipe_transport = t
local:
  driver = accept
  domains = +local_domains
  transport = t
remote:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.1
  transport = t

begin transports
t:
  driver = appendfile
  file = /dev/null
"""


def exim_binary() -> str:
    found = shutil.which("exim4") or shutil.which("exim") or \
        next((p for p in ("/usr/sbin/exim4", "/usr/sbin/exim") if Path(p).exists()), None)
    if found is None:
        pytest.fail("exim is not installed: apt-get install exim4-daemon-heavy", pytrace=False)
    return found


def _bt(conf: Path, addresses: list[str]) -> str:
    proc = subprocess.run([exim_binary(), "-C", str(conf), "-bt", *addresses],
                          capture_output=True, text=True, timeout=120)
    assert "error" not in proc.stderr.lower(), proc.stderr
    return proc.stdout


def exim_forwards(conf: Path, addresses: list[str]) -> dict[str, bool]:
    """address -> whether ``exim -bt`` routes any of its deliveries to the remote router.

    Many addresses go into one ``exim -bt`` run; each block of its output names the
    original address as the last ``<--`` ancestor.  Pipe and file deliveries show no
    ancestors, so addresses left unattributed are tested again one by one."""
    result = {a: False for a in addresses}
    for start in range(0, len(addresses), 200):
        chunk = addresses[start:start + 200]
        output = _bt(conf, chunk)
        seen = set()
        for block in re.split(r"\n(?=\S)", output.strip()):
            lines = block.splitlines()
            ancestors = [line.strip()[4:] for line in lines if line.strip().startswith("<-- ")]
            head = lines[0]
            if head.startswith("mail to "):
                named = head[len("mail to "):].split(" is discarded")[0]
            else:
                named = re.split(r" is undeliverable| cannot be resolved| -> |\s", head, maxsplit=1)[0]
            original = (ancestors[-1] if ancestors else named).lower()
            if original not in result:
                assert " -> " in head, block  # a pipe/file delivery of a redirected address
                continue
            seen.add(original)
            if any(line.strip().startswith("router = remote") for line in lines):
                result[original] = True
        for address in set(chunk) - seen:
            output = _bt(conf, [address])
            assert output.strip(), f"no exim -bt answer for {address}"
            result[address] = "router = remote" in output
    return result


HAND_WRITTEN = """\
# every construct the parser knows, as Exim reads it
a@d0.example: b@d0.example
b@d0.example: out@gmail.example
c@d0.example: d@d1.example
d@d1.example: c@d0.example
e@d0.example: e@d0.example, out@gmail.example
f@d0.example: out@gmail.example, :blackhole:
g@d0.example: out@gmail.example, :fail: gone, more@gmail.example
h@d0.example: :defer: later, out@gmail.example
i@d0.example: |/bin/true, /tmp/exim-policy-never-written
j@d0.example: \\j, \\out@gmail.example
k@d0.example: k2
k2@d0.example: Some One <out@gmail.example>
"Quoted One@d0.example": out@gmail.example
L@D0.EXAMPLE: out@gmail.example
m@d0.example out@gmail.example
n@d0.example: mbox@d0.example,
   out@gmail.example
# a comment ends the continuation
o@d0.example: mbox@d0.example,
# here
   out@gmail.example
p@d0.example: :include:{include}
q@d0.example:
r@d0.example: :unknown:, s@d3.example
*@d3.example: catch@gmail.example
kept@d3.example: kept@d0.example
t@d0.example: kept@d3.example
*: postmaster
postmaster@d1.example: out@gmail.example
xa@d0.example: mbox@d0.example, #out@gmail.example, out2@gmail.example
xb@d0.example: (only a comment), out@gmail.example
xc@d0.example: :, :unk, out@gmail.example
xd@d0.example: out@[127.0.0.1]
xe@d0.example: @relay.example,@relay2.example:out@gmail.example
xf@d0.example: "out@gmail.example"
xg@d0.example: mbox@d0.example, out@gmail.example,,,
xh@d0.example: /X=y/@gate.example
xi@d0.example: mbox@d0.example, Gateway </S=x/@gate.example>
xj@d0.example: "|/bin/true out@gmail.example"
"""


@pytest.mark.parametrize("case", ["hand-written", "generated-1", "generated-2"])
def test_exim_agrees(tmp_path, case):
    if case == "hand-written":
        include = tmp_path / "list.inc"
        include.write_text("# included\nmbox@d0.example\nout@gmail.example\n")
        aliases = tmp_path / "virtual"
        aliases.write_text(HAND_WRITTEN.format(include=include))
        domains = ["d0.example", "d1.example", "d2.example", "d3.example"]
    else:
        seed = int(case[-1])
        aliases = alias_sets.generate(tmp_path, seed, 250, 500, 5)
        domains = (tmp_path / "domains").read_text().split()
    (tmp_path / "spool").mkdir()
    conf = tmp_path / "exim.conf"
    conf.write_text(EXIM_CONF.format(domains=" : ".join(domains), dir=tmp_path, aliases=aliases))

    local = frozenset(domains)
    source = lsearch.read(str(aliases), local, detail=True)
    entries = alias_sets.entries(source)
    graph = ForwardingGraph([source], domains, detail=True)
    fast = ForwardingGraph([lsearch.read(str(aliases), local)], domains)
    assert fast.entries() == graph.entries()

    keys = [key for key, _t, _l in entries if not key.startswith("*")]
    mailboxes = {t for _k, targets, _l in entries for t in targets
                 if t[0].isalnum() and t.rpartition("@")[2] in domains}
    fresh = [f"nobody-{i}@{d}" for i, d in enumerate(domains)]
    addresses = sorted(set(keys) | mailboxes | set(fresh))
    addresses = [a for a in addresses if " " not in a]  # exim -bt wants them quoted
    verdicts = exim_forwards(conf, addresses)
    assert any(verdicts.values()) and not all(verdicts.values())
    wrong = {a: exim for a, exim in verdicts.items() if graph.is_forwarding(a) != exim}
    assert wrong == {}, "exim and the graph disagree (address: exim's verdict)"
    # the map itself: every forwarding key is listed, directly or through @domain
    entries = set(graph.entries())
    for address, forwards in verdicts.items():
        if forwards:
            assert address in entries or f"@{address.rpartition('@')[2]}" in entries, address
    if case == "hand-written":
        assert graph.is_forwarding("quoted one@d0.example")
        expected_forwarding = {"a", "b", "e", "g", "j", "k", "k2", "l", "m", "n", "p", "r",
                               "xb", "xc", "xd", "xe", "xf", "xg", "xh", "xi"}
        assert {a.split("@")[0] for a, v in verdicts.items()
                if v and a.endswith("@d0.example")} == expected_forwarding
