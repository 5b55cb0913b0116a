"""Exceptions of the lab package."""
from __future__ import annotations


class LabError(RuntimeError):
    """A lab component failed to start, answer or stop; the message says where to look."""


class LabUnavailable(LabError):
    """The machine cannot run the lab (not root, or a binary is missing).

    The message names the Debian package to install, so a test fixture can show it as is.
    """
