"""Score and threshold formatting shared by both reply codecs.

Exim's ``spam`` condition is true iff ``score >= threshold`` where both numbers are parsed
back (``sscanf %lf``) from the text we print (docs/wire-formats.md, "Exim's reply parser:
variant=rspamd" and "Exim's reply parser: SpamAssassin variant"). The decision, not the raw
numbers, must decide that truth, so the printed threshold is chosen from the *printed*
score: :func:`exim_threshold`.

Numbers are always formatted with ``%``-formatting, which ignores the locale: Exim needs
``.`` as the decimal separator (a ``,`` makes it DEFER).
"""
from __future__ import annotations

import math

#: Rspamd's required_score with Debian defaults; used when there is no scan result
DEFAULT_REQUIRED = 15.0

#: keeps printed numbers short and finite (Rspamd itself reports NaN as 0.0)
SCORE_LIMIT = 1_000_000.0


def clean_score(value: float | None) -> float:
    """A finite float in [-SCORE_LIMIT, SCORE_LIMIT]: NaN/None -> 0.0, infinities clamped."""
    if value is None or math.isnan(value):
        return 0.0
    return max(-SCORE_LIMIT, min(SCORE_LIMIT, float(value)))


def format_number(value: float, decimals: int = 2) -> str:
    """A finite ``value`` as printed on the wire (``%.{decimals}f``); never ``-0.00``."""
    text = f"{value:.{decimals}f}"
    if text[0] == "-" and float(text) == 0.0:
        text = text[1:]
    return text


def format_score(value: float | None, decimals: int = 2) -> str:
    """A score as printed on the wire: :func:`clean_score`, then :func:`format_number`."""
    if value is None or not -SCORE_LIMIT <= value <= SCORE_LIMIT:  # (NaN too)
        value = clean_score(value)
    return format_number(value, decimals)


def exim_threshold(score: float | None, required: float | None, reject: bool,
                   decimals: int = 2) -> float:
    """The threshold to print so that Exim's ``score >= threshold`` equals ``reject``.

    ``score`` is the value printed with :func:`format_score`; print the result with
    :func:`format_number` (it may lie one step beyond :data:`SCORE_LIMIT`).
    ``required`` (or :data:`DEFAULT_REQUIRED` when None) is kept whenever its printed value
    already gives the right answer, so the common case shows Rspamd's own threshold.
    Otherwise the smallest printed value that does is returned: the printed score itself for
    a reject below the threshold (forwarding reject at 6.90/15 -> 6.90), one step (10**-decimals)
    above the printed score for a non-reject at or above it (20.00 -> 20.01).
    The returned float prints to exactly the intended text.
    """
    shown = float(format_score(score, decimals))
    base = float(format_score(DEFAULT_REQUIRED if required is None else required, decimals))
    if (shown >= base) == reject:
        return base
    if reject:
        return shown
    step = 10.0 ** -decimals
    candidate = float(format_number(shown + step, decimals))
    # float rounding could print the same text again; walk up until the text is larger
    while candidate <= shown:
        candidate = float(format_number(candidate + step, decimals))
    return candidate
