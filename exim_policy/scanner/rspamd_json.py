"""Rspamd's ``/checkv2`` JSON both ways: a reply -> :class:`ScanResult` (the scanner
client), a :class:`Symbol` -> its JSON object (the HTTP front's replies,
protocol/checkv2.py)."""
from __future__ import annotations

import json
import math

try:  # (the "fast" extra) a third of json.loads's time on Rspamd's replies
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _fast_loads = None

from ..model import ScanResult, Symbol
from . import BAD_REPLY, RSPAMD_ERROR, ScannerError


def loads(data: bytes) -> object:
    """``data`` as JSON: by orjson when it is installed, else (and for what orjson refuses:
    NaN, Infinity, integers past 64 bits, UTF-16) by json.loads, so that both accept the
    same replies."""
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except ValueError:
            pass
    return json.loads(data)


def _number(doc: dict, key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ScannerError(f"bad JSON from Rspamd: {key!r} is not a number", BAD_REPLY)
    return float(value)


def result_from_json(doc: object) -> ScanResult:
    """``/checkv2`` JSON -> ScanResult (3.4 shapes: messages object or list, milter
    add_headers values as one object or a list of them)."""
    if not isinstance(doc, dict):
        raise ScannerError("bad JSON from Rspamd: not an object", BAD_REPLY)
    if "error" in doc:
        raise ScannerError(f"Rspamd error: {doc['error']}", RSPAMD_ERROR)
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise ScannerError("bad JSON from Rspamd: no action", BAD_REPLY)
    raw_symbols = doc.get("symbols") or {}
    if not isinstance(raw_symbols, dict):
        raise ScannerError("bad JSON from Rspamd: symbols is not an object", BAD_REPLY)
    symbols = [_symbol(name, sym) for name, sym in raw_symbols.items()]
    raw_messages = doc.get("messages") or {}
    if isinstance(raw_messages, dict):
        messages = tuple((str(k), str(v)) for k, v in raw_messages.items())
    elif isinstance(raw_messages, list):
        messages = tuple(("", str(v)) for v in raw_messages)
    else:
        messages = ()
    return ScanResult(
        action=action,
        score=_number(doc, "score"),
        required_score=_number(doc, "required_score"),
        symbols=tuple(symbols),
        messages=messages,
        message_id=doc.get("message-id") if isinstance(doc.get("message-id"), str) else None,
        subject=doc.get("subject") if isinstance(doc.get("subject"), str) else None,
        is_skipped=bool(doc.get("is_skipped", False)),
        add_headers=_milter_headers(doc.get("milter")),
        raw=doc,
    )


def _symbol(name: object, sym: object) -> Symbol:
    """One entry of ``symbols`` (a value that is not an object: a symbol with no score)."""
    if type(sym) is not dict:
        return Symbol(str(name))
    score = sym.get("score", 0.0)
    options = sym.get("options")
    description = sym.get("description")
    return Symbol(str(name),
                  float(score) if isinstance(score, (int, float)) else 0.0,
                  tuple(map(str, options)) if type(options) is list else (),
                  description if type(description) is str else None)


def _milter_headers(milter: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(milter, dict) or not isinstance(milter.get("add_headers"), dict):
        return ()
    out = []
    for name, spec in milter["add_headers"].items():
        for item in spec if isinstance(spec, list) else [spec]:
            value = item.get("value") if isinstance(item, dict) else item
            if isinstance(value, str):
                out.append((str(name), value))
    return tuple(out)


def symbol_json(symbol: Symbol) -> dict:
    """A symbol as Rspamd writes it in ``symbols`` (keyed by its name there)."""
    out: dict = {"name": symbol.name, "score": symbol.score, "metric_score": symbol.score,
                 "options": list(symbol.options)}
    if symbol.description is not None:
        out["description"] = symbol.description
    return out
