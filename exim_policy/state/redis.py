"""The account store in Redis, shared by every MX node that points at it.

Through redis-py's asyncio client (``redis.asyncio``). Each read and each ``record`` is
one Lua script, so it is atomic: two shims that see an account's fifth spam verdict at
the same moment open one incident, not two, and their counts add up.

Keys (``P`` = ``accounts.redis_prefix``, ``H`` = the first 32 hex digits of the SHA-256 of
the account id, so no account name is ever part of a key; ``{H}`` keeps an account's keys
together)::

    P{H}:a   hash: id, status, incident, since_hold, last_seen
    P{H}:m   sorted set: one member per counted message ("time:nonce:recipients")
    P{H}:r   sorted set: recipient -> time it was last counted
    P{H}:s   sorted set: one member per spam verdict
    P{H}:x   list: the newest spam messages' evidence (JSON), capped
    P{H}:i   hash: incident id -> JSON;  P{H}:il  list of its ids, newest first, capped
    P{H}:au  list: audit entries (JSON), newest first, capped
    Pincident  the incident id counter;  Paccounts  sorted set: H -> last activity

The time series expire with the longest window; the hash, incidents and audit trail with
``accounts.history`` unless the account is held or locked (then they persist). Redis
Cluster is not supported (the counter and the index are global keys); Sentinel or a
single server is.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ..config import AccountsConfig, ConfigError
from ..model import (AccountState, AccountStatus, Counts, Incident, MessageEvent, Transition,
                     TransitionKind)
from .base import (AUDIT_KEPT, EVIDENCE_KEPT, INCIDENTS_KEPT, AccountDetail, AccountSummary,
                   Applied, AuditEntry, StoreError, audit_action, event_from_json, event_json,
                   evidence, incident_from_json, recipient_key,
                   windows_of)
from .memory import DAEMON

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - the [redis] extra is not installed
    aioredis = None  # type: ignore[assignment]
    RedisError = OSError  # type: ignore[assignment,misc]

#: a script argument as the client sends it
_Arg = bytes | str | int | float
#: seconds for a connect and for one command (a slow store must not hold mail long)
TIMEOUT = 2.0

# KEYS: a m r s i; ARGV: now, spam window, n windows, windows..., recipients...
_STATE = """
local now = tonumber(ARGV[1])
local nw = tonumber(ARGV[3])
local acct = redis.call('HMGET', KEYS[1], 'status', 'incident', 'since_hold')
local out = {acct[1] or 'ok', acct[3] or '0', false}
if acct[2] and acct[2] ~= '' then out[3] = redis.call('HGET', KEYS[5], acct[2]) or false end
for i = 1, nw do
  local start = now - tonumber(ARGV[3 + i])
  local members = redis.call('ZRANGEBYSCORE', KEYS[2], start, '+inf')
  local total = 0
  for _, m in ipairs(members) do total = total + tonumber(string.match(m, ':(%d+)$')) end
  local fresh = 0
  for j = 4 + nw, #ARGV do
    local at = redis.call('ZSCORE', KEYS[3], ARGV[j])
    if (not at) or tonumber(at) < start then fresh = fresh + 1 end
  end
  out[#out + 1] = #members
  out[#out + 1] = total
  out[#out + 1] = redis.call('ZCOUNT', KEYS[3], start, '+inf')
  out[#out + 1] = fresh
end
out[#out + 1] = redis.call('ZCOUNT', KEYS[4], now - tonumber(ARGV[2]), '+inf')
return out
"""

# KEYS: a m r s x i il au seq idx
# ARGV: now, retention, history, account id, key hash, evidence kept, incidents kept,
#       audit kept, has event, counted, spam, recipients (count), nonce, event JSON,
#       n recipient keys, recipient keys..., n transitions,
#       per transition: kind, to, expect (comma list), shadow, mode, who, reason, action
_RECORD = """
local now = tonumber(ARGV[1])
local retention, history = tonumber(ARGV[2]), tonumber(ARGV[3])
local a = KEYS[1]
redis.call('HSET', a, 'id', ARGV[4])
redis.call('HSETNX', a, 'status', 'ok')
local status = redis.call('HGET', a, 'status')
local p = 9
local nkeys = tonumber(ARGV[p + 6])
if ARGV[p] == '1' then
  redis.call('HSET', a, 'last_seen', ARGV[1])
  if ARGV[p + 1] == '1' then
    redis.call('ZADD', KEYS[2], now, ARGV[1] .. ':' .. ARGV[p + 4] .. ':' .. ARGV[p + 3])
    for j = 1, nkeys do redis.call('ZADD', KEYS[3], now, ARGV[p + 6 + j]) end
  end
  if ARGV[p + 2] == '1' then
    redis.call('ZADD', KEYS[4], now, ARGV[1] .. ':' .. ARGV[p + 4])
    redis.call('LPUSH', KEYS[5], ARGV[p + 5])
    redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[6]) - 1)
    if status == 'held' then redis.call('HINCRBY', a, 'since_hold', 1) end
  end
end
p = p + 7 + nkeys
for _, k in ipairs({KEYS[2], KEYS[3], KEYS[4]}) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (now - retention))
  redis.call('PEXPIRE', k, math.ceil(retention * 1000) + 60000)
end
redis.call('PEXPIRE', KEYS[5], math.ceil(retention * 1000) + 60000)
redis.call('ZADD', KEYS[10], now, ARGV[5])

local applied = {}
local count = tonumber(ARGV[p])
p = p + 1
for t = 1, count do
  local kind, to, expect = ARGV[p], ARGV[p + 1], ARGV[p + 2]
  local shadow, who, reason, action = ARGV[p + 3], ARGV[p + 5], ARGV[p + 6], ARGV[p + 7]
  p = p + 8
  status = redis.call('HGET', a, 'status')
  local current = redis.call('HGET', a, 'incident')
  local old = false
  if current and current ~= '' then old = cjson.decode(redis.call('HGET', KEYS[6], current)) end
  local ok = true
  if kind == 'opened' then
    ok = (not old) or (old['shadow'] and shadow ~= '1')
  else
    if expect ~= '' then
      ok = false
      for s in string.gmatch(expect, '[^,]+') do if s == status then ok = true end end
    end
    if ok and kind == 'unlocked' then ok = (status ~= 'ok') or (old ~= false) end
  end
  if ok then
    local incident
    if kind == 'unlocked' then
      if old then
        old['state'] = 'closed'
        old['closed'] = now
        redis.call('HSET', KEYS[6], tostring(old['id']), cjson.encode(old))
        incident = old
      else
        incident = {id = 0, account = ARGV[4], opened = now, state = 'closed',
                    reason = reason, shadow = false, closed = now, evidence = {}}
      end
      redis.call('HSET', a, 'status', 'ok', 'incident', '', 'since_hold', 0)
      redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
    elseif kind == 'opened' or not old then
      if old then
        old['state'] = 'closed'
        old['closed'] = now
        redis.call('HSET', KEYS[6], tostring(old['id']), cjson.encode(old))
      end
      local id = redis.call('INCR', KEYS[9])
      local istate = ({ok = 'notify', held = 'held', locked = 'locked'})[to]
      incident = {id = id, account = ARGV[4], opened = now, state = istate, reason = reason,
                  shadow = (shadow == '1'), evidence = {}}
      redis.call('HSET', KEYS[6], tostring(id), cjson.encode(incident))
      redis.call('LPUSH', KEYS[7], id)
      local dropped = redis.call('LRANGE', KEYS[7], tonumber(ARGV[7]), -1)
      for _, gone in ipairs(dropped) do redis.call('HDEL', KEYS[6], gone) end
      redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[7]) - 1)
      redis.call('HSET', a, 'status', to, 'incident', id, 'since_hold', 0)
    else
      old['state'] = ({ok = 'notify', held = 'held', locked = 'locked'})[to]
      redis.call('HSET', KEYS[6], tostring(old['id']), cjson.encode(old))
      redis.call('HSET', a, 'status', to)
      incident = old
    end
    redis.call('LPUSH', KEYS[8], cjson.encode({at = now, who = who, action = action,
                                               reason = reason}))
    redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[8]) - 1)
    applied[#applied + 1] = t
    applied[#applied + 1] = cjson.encode(incident)
  end
end

status = redis.call('HGET', a, 'status')
for _, k in ipairs({a, KEYS[6], KEYS[7], KEYS[8]}) do
  if status == 'ok' then redis.call('EXPIRE', k, math.ceil(history))
  else redis.call('PERSIST', k) end
end
return applied
"""

# KEYS: a m r s x au; ARGV: who, reason, now, audit kept
_RESET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('LPUSH', KEYS[6], cjson.encode({at = tonumber(ARGV[3]), who = ARGV[1],
                                           action = 'reset', reason = ARGV[2]}))
redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[4]) - 1)
return 1
"""

# KEYS: i; ARGV: incident id, evidence JSON
_EVIDENCE = """
local text = redis.call('HGET', KEYS[1], ARGV[1])
if not text then return 0 end
local incident = cjson.decode(text)
incident['evidence'] = cjson.decode(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(incident))
return 1
"""


def key_hash(account: str) -> str:
    return hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _text(value: bytes | str | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def _incident(text: bytes | str) -> Incident:
    incident = incident_from_json(text)
    # cjson writes an empty Lua table as {} and keeps whole numbers as such
    return Incident(int(incident.id), incident.account, float(incident.opened),
                    incident.state, incident.reason, bool(incident.shadow),
                    float(incident.closed) if incident.closed is not None else None,
                    incident.evidence if isinstance(incident.evidence, dict) else {})


class RedisStore:
    def __init__(self, config: AccountsConfig, url: str | None = None) -> None:
        if aioredis is None:
            raise ConfigError("accounts.store: \"redis\" needs the redis package "
                              "(pip install 'exim-policy[redis]')")
        self.config = config
        self.prefix = config.redis_prefix
        # After Redis restarts, each pooled connection is closed on the server side and
        # fails its next command once, however much later that comes: retry a connection
        # error once, at once, on a new connection (a store that is down is refused again
        # at once; timeouts are not retried, a slow store must not hold mail twice as long)
        self.client = aioredis.from_url(url or config.redis_url, socket_timeout=TIMEOUT,
                                        socket_connect_timeout=TIMEOUT,
                                        health_check_interval=30,
                                        retry=Retry(NoBackoff(), 1,
                                                    supported_errors=(RedisConnectionError,)),
                                        retry_on_error=[RedisConnectionError])
        self._state_script = self.client.register_script(_STATE)
        self._record_script = self.client.register_script(_RECORD)
        self._reset_script = self.client.register_script(_RESET)
        self._evidence_script = self.client.register_script(_EVIDENCE)

    def _keys(self, account: str) -> dict[str, str]:
        base = f"{self.prefix}{{{key_hash(account)}}}:"
        return {name: base + name for name in ("a", "m", "r", "s", "x", "i", "il", "au")}

    async def _call(self, script: AsyncScript, keys: list[str], args: list[_Arg]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisError as exc:
            raise StoreError(f"account store {self.config.redis_url}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"account store {self.config.redis_url}: "
                             f"{exc.strerror or exc}") from None

    # -------------------------------------------------------------------- reading --
    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        k = self._keys(account)
        windows = windows_of(self.config)
        wanted = sorted({recipient_key(r) for r in recipients})
        reply = await self._call(self._state_script, [k["a"], k["m"], k["r"], k["s"], k["i"]],
                                 [repr(now), repr(self.config.incident.window), len(windows),
                                  *map(repr, windows), *wanted])
        counts = []
        for i, window in enumerate(windows):
            m, total, unique, fresh = (int(v) for v in reply[3 + 4 * i:7 + 4 * i])
            counts.append(Counts(window, m, total, unique, fresh))
        incident = _incident(reply[2]) if reply[2] else None
        return AccountState(account, AccountStatus(_text(reply[0])), incident, tuple(counts),
                            int(reply[-1]), int(reply[1]))

    # -------------------------------------------------------------------- writing --
    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        k = self._keys(account)
        rkeys = sorted({recipient_key(r) for r in event.recipients}) if event else []
        args: list[_Arg] = [repr(now), repr(self.config.retention), repr(self.config.history),
                      account, key_hash(account), EVIDENCE_KEPT, INCIDENTS_KEPT, AUDIT_KEPT]
        if event is not None:
            args += ["1", "1" if event.counted else "0", "1" if event.spam else "0",
                     len(event.recipients), uuid.uuid4().hex[:12], event_json(event)]
        else:
            args += ["0", "0", "0", 0, "", ""]
        args += [len(rkeys), *rkeys, len(transitions)]
        for t in transitions:
            args += [t.kind.value, t.to.value, ",".join(s.value for s in t.expect),
                     "1" if t.shadow else "0", t.mode, t.who or DAEMON, t.reason,
                     audit_action(t)]
        # an unlock clears what the evidence is made of: read it first
        before = {i: await self._proof(account, t, now) for i, t in enumerate(transitions)
                  if t.kind is TransitionKind.UNLOCKED}
        reply = await self._call(
            self._record_script,
            [k["a"], k["m"], k["r"], k["s"], k["x"], k["i"], k["il"], k["au"],
             self.prefix + "incident", self.prefix + "accounts"], args)
        applied = []
        for i in range(0, len(reply), 2):
            index = int(reply[i]) - 1
            transition = transitions[index]
            incident = _incident(reply[i + 1])
            proof = before.get(index) or await self._proof(account, transition, now)
            if incident.id:
                await self._call(self._evidence_script, [k["i"]],
                                 [str(incident.id), json.dumps(proof)])
            applied.append(Applied(transition, Incident(
                incident.id, incident.account, incident.opened, incident.state,
                incident.reason, incident.shadow, incident.closed, proof)))
        return tuple(applied)

    async def _proof(self, account: str, transition: Transition,
                     now: float) -> dict[str, object]:
        state = await self.state(account, (), now)
        return evidence(account, transition, state, await self._evidence(account),
                        self.config, now)

    async def _evidence(self, account: str) -> list[MessageEvent]:
        try:
            raw = await self.client.lrange(self._keys(account)["x"], 0, -1)
        except RedisError as exc:
            raise StoreError(f"account store {self.config.redis_url}: {exc}") from None
        return [event_from_json(text) for text in raw]

    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        k = self._keys(account)
        done = await self._call(self._reset_script,
                                [k["a"], k["m"], k["r"], k["s"], k["x"], k["au"]],
                                [who, reason, repr(now), AUDIT_KEPT])
        return bool(done)

    # ------------------------------------------------------------------ for humans --
    async def detail(self, account: str, now: float) -> AccountDetail | None:
        k = self._keys(account)
        try:
            last_seen = await self.client.hget(k["a"], "last_seen")
            if not await self.client.exists(k["a"]):
                return None
            ids = await self.client.lrange(k["il"], 0, -1)
            texts = await self.client.hmget(k["i"], ids) if ids else []
            audit = await self.client.lrange(k["au"], 0, -1)
        except RedisError as exc:
            raise StoreError(f"account store {self.config.redis_url}: {exc}") from None
        entries = []
        for text in audit:
            doc = json.loads(text)
            entries.append(AuditEntry(float(doc["at"]), doc["who"], doc["action"],
                                      doc["reason"]))
        return AccountDetail(await self.state(account, (), now),
                             float(last_seen) if last_seen else None,
                             tuple(_incident(t) for t in texts if t), tuple(entries),
                             tuple(await self._evidence(account)))

    async def accounts(self, now: float) -> list[AccountSummary]:
        try:
            # a plain ZRANGE: members only (the client's type also covers WITHSCORES)
            hashes = cast("list[bytes]",
                          await self.client.zrange(self.prefix + "accounts", 0, -1))
            rows = []
            for h in hashes:
                base = f"{self.prefix}{{{_text(h)}}}:a"
                rows.append(await self.client.hmget(base, "id", "status", "incident",
                                                    "last_seen"))
        except RedisError as exc:
            raise StoreError(f"account store {self.config.redis_url}: {exc}") from None
        out = []
        for account, status, incident, last_seen in rows:
            if account is None:
                continue  # expired since
            account = _text(account)
            state = await self.state(account, (), now)
            out.append(AccountSummary(
                account, AccountStatus(_text(status) or "ok"), float(last_seen or 0),
                int(incident) if incident and _text(incident) else None,
                state.windows[0].messages if state.windows else 0, state.spam_verdicts))
        return sorted(out, key=lambda s: s.account)

    async def prune(self, now: float) -> None:
        """Drop index entries of accounts whose keys have expired (Redis expires the rest)."""
        index = self.prefix + "accounts"
        try:
            stale = cast("list[bytes]", await self.client.zrangebyscore(
                index, "-inf", now - self.config.retention))
            for h in stale:
                if not await self.client.exists(f"{self.prefix}{{{_text(h)}}}:a"):
                    await self.client.zrem(index, h)
        except RedisError as exc:
            raise StoreError(f"account store {self.config.redis_url}: {exc}") from None

    async def refresh(self, now: float) -> None:
        pass  # every read goes to Redis

    async def close(self) -> None:
        await self.client.aclose()
