"""Fixture helpers of the end-to-end tests: the stack, a Debian Exim configuration, log
checks. The SMTP client, the mailbox / sink lookups and the addresses are the lab's
(:mod:`exim_policy.lab.smtp`, :mod:`exim_policy.lab.addresses`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from exim_policy.lab import RspamdLab, SmtpSink
from exim_policy.lab.exim import HOSTNAME, EximLab
from exim_policy.lab.shim import ShimLab


#: the main section of a lab site configuration (EximLab ``template=``), on the SITE_*
#: macros EximLab defines: loopback, the lab's spool and logs, no DNS at all
LAB_MAIN = """\
primary_hostname = SITE_HOSTNAME
qualify_domain = SITE_QUALIFY_DOMAIN
domainlist local_domains = SITE_DOMAINS
daemon_smtp_ports = SITE_PORTS
local_interfaces = SITE_INTERFACES
spool_directory = SITE_SPOOL
log_file_path = SITE_LOG_PATH
pid_file_path = SITE_PID
keep_environment =
never_users = root
host_lookup =
host_lookup_order =
rfc1413_hosts =
rfc1413_query_timeout = 0s
log_selector = -host_lookup_failed
"""


def no_bounce_since(exim: EximLab, log_offset: int) -> bool:
    """True if Exim created no bounce (a message from <>) after ``log_offset`` of the log."""
    return not re.search(r"^\S+ \S+ \S+ <= <> ", exim.mainlog[log_offset:], re.MULTILINE)


def normalise(text: str) -> str:
    return " ".join(text.split())


def build_debian_config(base: Path, exim_dir: Path, site_macros: str, *,
                        rcpt_hook: bool = False, auth: str = "",
                        files: dict[str, str] | None = None) -> Path:
    """Debian's split configuration (a copy of /etc/exim4 under ``base``) plus the
    snippets of ``exim_dir/debian``, built with update-exim4.conf; returns the config.

    ``site_macros`` go first in main/ (the test's own settings); a private spool and "no
    DNS at all" are added here, and the DATA hook (plus the RCPT hook with ``rcpt_hook``)
    points at the copied snippets, as exim/debian/README.md says. ``auth``: an
    authenticator of the test's, in conf.d/auth/; ``files``: more files in the copied
    /etc/exim4 (name -> text, readable by Debian-exim).
    """
    import shutil
    import subprocess

    if shutil.which("update-exim4.conf") is None:
        import pytest

        pytest.fail("update-exim4.conf not found: install the Debian package 'exim4-config'",
                    pytrace=False)
    confdir = base / "etc-exim4"
    shutil.copytree("/etc/exim4", confdir, symlinks=True)
    settings = confdir / "update-exim4.conf.conf"
    settings.write_text(re.sub(r"^dc_use_split_config=.*$", "dc_use_split_config='true'",
                               settings.read_text(), flags=re.M))
    conf_d = confdir / "conf.d"
    snippets = exim_dir / "debian" / "conf.d"
    for snippet in snippets.rglob("*"):
        if snippet.is_file():
            shutil.copyfile(snippet, conf_d / snippet.relative_to(snippets))
    if auth:
        (conf_d / "auth" / "35_test_authenticator").write_text(auth)
    for name, text in (files or {}).items():
        (confdir / name).write_text(text)
        shutil.chown(confdir / name, "root", "Debian-exim")
        (confdir / name).chmod(0o640)
    spool = base / "spool"
    spool.mkdir()
    shutil.chown(spool, "Debian-exim", "Debian-exim")
    hooks = f"CHECK_DATA_LOCAL_ACL_FILE = {conf_d}/acl/exim-policy_check_data.conf\n"
    if rcpt_hook:
        hooks += f"CHECK_RCPT_LOCAL_ACL_FILE = {conf_d}/acl/exim-policy_check_rcpt.conf\n"
    # Debian leaves primary_hostname unset: Exim then resolves the machine's own name at
    # every start, -bV and -bh, through the system resolver (a server off this machine
    # when /etc/hosts has no line for it). A fixed name, and no host lookups at all.
    (conf_d / "main" / "000_test_site").write_text(
        site_macros + hooks + f"SPOOLDIR = {spool}\n"
        f"MAIN_HARDCODE_PRIMARY_HOSTNAME = {HOSTNAME}\n"
        "MAIN_HOST_LOOKUP =\nhost_lookup_order =\nrfc1413_hosts =\n")
    output = base / "exim4.conf"
    built = subprocess.run(["update-exim4.conf", "-d", str(confdir), "-o", str(output)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stdout + built.stderr
    output.chmod(0o644)
    return output


@dataclass
class Stack:
    """Exim -> shim -> Rspamd, and the SMTP sink Exim relays to."""

    exim: EximLab
    shim: ShimLab
    rspamd: RspamdLab
    sink: SmtpSink


def running_stack(exim: EximLab, shim: ShimLab, rspamd: RspamdLab, sink: SmtpSink) -> Stack:
    """The stack, with the shim and Exim (re)started if a test stopped them."""
    if not shim.alive():
        shim.start()
    if not exim.alive():
        exim.start()
    return Stack(exim, shim, rspamd, sink)


def start_or_fail(lab, what: str):
    """Start a lab part (Exim, the shim) for a fixture and return it; if it cannot start,
    stop what did and fail the test with one line (``cannot start <what>: ...``)."""
    try:
        lab.start()
    except RuntimeError as exc:  # (LabError and LabUnavailable are RuntimeErrors)
        lab.stop()
        pytest.fail(f"cannot start {what}: {exc}", pytrace=False)
    return lab
