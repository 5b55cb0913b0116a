"""What the pipeline needs from a wire protocol: the :class:`Codec` interface.

A codec turns a parsed :class:`~exim_policy.model.Request` into the envelope the policy
reads, and a :class:`~exim_policy.model.Decision` into the answer its transport sends
(reply bytes for the spamd listener, a :class:`~.checkv2.Reply` for the HTTP front). Some
requests are answered without a scan (a ``PING``). The pipeline calls only these methods,
so it never looks at which protocol a request came in.

Implementations: :data:`.rspamc.CODEC` (Exim ``variant=rspamd``), :data:`.spamc.CODEC`
(SpamAssassin: Exim's default variant, ``spamc``), :data:`.checkv2.CODEC` (the HTTP front).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

from ..model import Decision, Envelope, Request

if TYPE_CHECKING:
    from ..config import Config

Answer = TypeVar("Answer", covariant=True)


class Codec(Protocol[Answer]):
    #: the protocol's name in the log (``proto=``) and in the metrics (``protocol``)
    name: str

    def answer_at_once(self, request: Request) -> Answer | None:
        """The answer to a request that needs no scan (``PING``), else None."""

    def envelope(self, request: Request, config: Config) -> Envelope:
        """The envelope the request carries."""

    def reply(self, request: Request, decision: Decision, config: Config) -> Answer:
        """The answer for ``decision`` (also when it is ``defer``: each protocol has its
        own way of giving no verdict)."""
