"""Sans-IO codecs for the spamd-style protocols Exim speaks: bytes in, events out, replies as bytes.

* :mod:`.parser` -- :class:`~.parser.RequestParser` for both ``RSPAMC`` and ``SPAMC`` requests
* :mod:`.rspamc` -- Exim ``variant=rspamd``: envelope from headers, Rspamd-style reply
* :mod:`.spamc` -- SpamAssassin protocol (Exim default variant, ``spamc``)
* :mod:`.mbox` -- Exim's scan-file wrapper (``From `` line, ``X-Envelope-*``)
* :mod:`.scores` -- score/threshold printing that makes Exim's ``spam`` truth match the decision
"""
