"""The network guard's trace reader, on lines as strace 6.1 (Debian 12) writes them.

The lines below come from a real guarded run of this suite before Exim's host name was
pinned in the Debian-config tests: Exim asked the system resolver (10.255.255.53 here)
for its own name. contrib/test.sh also runs ``netguard --self-test`` before the suite,
which drives strace and the namespace for real with a probe.
"""
from __future__ import annotations

import pytest

from exim_policy.lab.netguard import allowed, isolated_argv, scan, strace_argv

EXIM_RESOLVER_TRACE = """\
8568  clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7f1) = 8569
8569  execve("/root/.cargo/bin/exim", ["exim", "-C", "/tmp/x/exim4.conf", "-bV"], 0x5642 /* 43 vars */) = -1 ENOENT (No such file or directory)
8569  execve("/usr/sbin/exim", ["exim", "-C", "/tmp/x/exim4.conf", "-bV"], 0x56422efd19b0 /* 43 vars */ <unfinished ...>
8568  <... clone resumed>)              = 8570
8569  <... execve resumed>)             = 0
8569  sendto(3, [{nlmsg_len=20, nlmsg_type=RTM_GETADDR, nlmsg_flags=NLM_F_REQUEST|NLM_F_DUMP, nlmsg_seq=1796227141, nlmsg_pid=0}, {ifa_family=AF_UNSPEC, ...}], 20, 0, {sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, 12) = 20
8569  connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT (No such file or directory)
8569  connect(4, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = -1 ENETUNREACH (Network is unreachable)
8089  connect(7, {sa_family=AF_INET6, sin6_port=htons(50881), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS (Operation now in progress)
8089  connect(8, {sa_family=AF_INET, sin_port=htons(11333), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)
8089  connect(9, {sa_family=AF_INET, sin_port=htons(0), sin_addr=inet_addr("0.0.0.0")}, 16) = 0
8093  sendmsg(70, {msg_name=NULL, msg_namelen=0, msg_iov=[{iov_base="\\5\\0", iov_len=4096}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, 0) = 4096
8093  sendto(5, "inet_addr(\\"10.9.9.9\\")", 20, 0, NULL, 0) = 20
"""


def test_the_exim_resolver_query_is_named_with_its_command_and_address():
    offences = scan(EXIM_RESOLVER_TRACE.splitlines(keepends=True))
    assert [(o.pid, o.call, o.address, o.port) for o in offences] == [
        (8569, "connect", "10.255.255.53", 53)]
    assert offences[0].command == "exim -C /tmp/x/exim4.conf -bV"
    assert str(offences[0]) == ("pid 8569 (exim -C /tmp/x/exim4.conf -bV): connect to "
                                "10.255.255.53:53")


def test_a_child_without_its_own_execve_is_named_after_its_parent():
    trace = (
        '100  execve("/usr/bin/python3", ["python3", "-m", "pytest"], 0x1 /* 3 vars */) = 0\n'
        "100  vfork( <unfinished ...>\n"
        '101  sendto(3, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), '
        'sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:db8::53", &sin6_addr), '
        "sin6_scope_id=0}, 28) = -1 ENETUNREACH (Network is unreachable)\n"
        "100  <... vfork resumed>)              = 101\n")
    [offence] = scan(trace.splitlines())
    assert (offence.command, offence.address, offence.port) == ("python3 -m pytest",
                                                               "2001:db8::53", 53)
    assert str(offence).endswith("sendto to [2001:db8::53]:53")


def test_an_unfinished_connect_is_read_from_its_first_half():
    trace = ('7  connect(4, {sa_family=AF_INET, sin_port=htons(25), '
             'sin_addr=inet_addr("192.0.2.25")}, 16 <unfinished ...>\n'
             "7  <... connect resumed>)  = -1 ENETUNREACH (Network is unreachable)\n")
    assert [(o.address, o.port) for o in scan(trace.splitlines())] == [("192.0.2.25", 25)]


def test_sendmmsg_with_several_addresses_reports_each():
    trace = ('9  sendmmsg(3, [{msg_hdr={msg_name={sa_family=AF_INET, sin_port=htons(53), '
             'sin_addr=inet_addr("198.51.100.1")}, msg_namelen=16}}, {msg_hdr={msg_name='
             '{sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, '
             'msg_namelen=16}}], 2, MSG_NOSIGNAL) = 2\n')
    assert [o.address for o in scan(trace.splitlines())] == ["198.51.100.1"]


@pytest.mark.parametrize("address,ok", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("0.0.0.0", True), ("::", True),
    ("::ffff:127.0.0.1", True), ("10.255.255.53", False), ("192.168.1.1", False),
    ("::ffff:10.0.0.1", False), ("fe80::1", False), ("2001:db8::1", False), ("junk", False),
])
def test_allowed_addresses(address, ok):
    assert allowed(address) is ok


def test_the_command_runs_in_its_own_namespace_under_strace():
    argv = strace_argv("/tmp/log", isolated_argv(["pytest", "-q"]))
    assert argv[:2] == ["strace", "-f"] and "--seccomp-bpf" in argv
    assert argv[argv.index("--") + 1:][:3] == ["unshare", "--net", "--"]
    assert argv[-2:] == ["pytest", "-q"]
