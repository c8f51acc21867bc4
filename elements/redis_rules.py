"""What redis_guard blocks: command rules and key rules, pure, judged on a resp.Command.

A command is named as the server names it: ASCII case does not matter, and the name ends
at a NUL byte (the server's lookup compares names with strcasecmp, which stops there; cutting
there too can only block more). `CONFIG` names every CONFIG subcommand, `CONFIG SET` one.
A command is blocked when a deny rule names it, or when allow rules exist and none names it.

Key rules (`protect`) block write commands that touch a key matching a Redis glob pattern.
Where a write command's keys are comes from Redis 7.0's own COMMAND table (first key, last
key, step; below); a command whose keys move (EVAL's numkeys, SORT ... STORE) has each of
its arguments treated as a key, and FLUSHALL, FLUSHDB and SWAPDB touch every key. Scripts
count as writes. What no rule can see: key names a script builds at run time, and commands
newer than the table; deny EVAL, EVALSHA, FCALL (and FUNCTION) where key rules must hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from elements.resp import Command

# name -> (first key, last key (negative: from the end), step); from redis-server 7.0.15's COMMAND
_KEYS: dict[str, tuple[int, int, int]] = {
    "append": (1, 1, 1), "bitfield": (1, 1, 1), "bitop": (2, -1, 1), "blmove": (1, 2, 1), "blpop": (1, -2, 1),
    "brpop": (1, -2, 1), "brpoplpush": (1, 2, 1), "bzpopmax": (1, -2, 1), "bzpopmin": (1, -2, 1),
    "copy": (1, 2, 1), "decr": (1, 1, 1), "decrby": (1, 1, 1), "del": (1, -1, 1), "expire": (1, 1, 1),
    "expireat": (1, 1, 1), "geoadd": (1, 1, 1), "geosearchstore": (1, 2, 1), "getdel": (1, 1, 1),
    "getex": (1, 1, 1), "getset": (1, 1, 1), "hdel": (1, 1, 1), "hincrby": (1, 1, 1), "hincrbyfloat": (1, 1, 1),
    "hmset": (1, 1, 1), "hset": (1, 1, 1), "hsetnx": (1, 1, 1), "incr": (1, 1, 1), "incrby": (1, 1, 1),
    "incrbyfloat": (1, 1, 1), "linsert": (1, 1, 1), "lmove": (1, 2, 1), "lpop": (1, 1, 1), "lpush": (1, 1, 1),
    "lpushx": (1, 1, 1), "lrem": (1, 1, 1), "lset": (1, 1, 1), "ltrim": (1, 1, 1), "move": (1, 1, 1),
    "mset": (1, -1, 2), "msetnx": (1, -1, 2), "persist": (1, 1, 1), "pexpire": (1, 1, 1), "pexpireat": (1, 1, 1),
    "pfadd": (1, 1, 1), "pfdebug": (2, 2, 1), "pfmerge": (1, -1, 1), "psetex": (1, 1, 1), "rename": (1, 2, 1),
    "renamenx": (1, 2, 1), "restore": (1, 1, 1), "restore-asking": (1, 1, 1), "rpop": (1, 1, 1),
    "rpoplpush": (1, 2, 1), "rpush": (1, 1, 1), "rpushx": (1, 1, 1), "sadd": (1, 1, 1), "sdiffstore": (1, -1, 1),
    "set": (1, 1, 1), "setbit": (1, 1, 1), "setex": (1, 1, 1), "setnx": (1, 1, 1), "setrange": (1, 1, 1),
    "sinterstore": (1, -1, 1), "smove": (1, 2, 1), "spop": (1, 1, 1), "srem": (1, 1, 1), "sunionstore": (1, -1, 1),
    "unlink": (1, -1, 1), "xack": (1, 1, 1), "xadd": (1, 1, 1), "xautoclaim": (1, 1, 1), "xclaim": (1, 1, 1),
    "xdel": (1, 1, 1), "xgroup|create": (2, 2, 1), "xgroup|createconsumer": (2, 2, 1),
    "xgroup|delconsumer": (2, 2, 1), "xgroup|destroy": (2, 2, 1), "xgroup|setid": (2, 2, 1), "xsetid": (1, 1, 1),
    "xtrim": (1, 1, 1), "zadd": (1, 1, 1), "zincrby": (1, 1, 1), "zpopmax": (1, 1, 1), "zpopmin": (1, 1, 1),
    "zrangestore": (1, 2, 1), "zrem": (1, 1, 1), "zremrangebylex": (1, 1, 1), "zremrangebyrank": (1, 1, 1),
    "zremrangebyscore": (1, 1, 1),
}
# writes whose keys move with their arguments (and the scripts): every argument may be a key
_MOVING = frozenset(("blmpop", "bzmpop", "georadius", "georadiusbymember", "lmpop", "migrate", "sort", "xreadgroup",
                     "zdiffstore", "zinterstore", "zmpop", "zunionstore", "eval", "evalsha", "fcall"))
_EVERY_KEY = frozenset(("flushall", "flushdb", "swapdb"))


def name(arg: bytes) -> str:
    """A command or subcommand name as the server looks it up: lower case, up to a NUL."""
    return arg.split(b"\0", 1)[0].lower().decode("latin-1")


def shown(arg: bytes) -> str:
    """A client's command name fit for an error line: printable ASCII, upper case, at most 40 characters."""
    text = "".join(c if " " < c < "\x7f" else "?" for c in name(arg)[:40])
    return text.upper()


@dataclass(frozen=True, slots=True)
class Rule:
    """`command`, or one of its subcommands."""

    command: str
    sub: str | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        words = text.split()
        if not 1 <= len(words) <= 2:
            raise ValueError(f"{text!r}: a rule is a command, or a command and a subcommand (CONFIG SET)")
        return cls(words[0].lower(), words[1].lower() if len(words) == 2 else None)

    def names(self, command: Command) -> bool:
        args = command.args
        if not args or name(args[0]) != self.command:
            return False
        return self.sub is None or len(args) > 1 and name(args[1]) == self.sub

    def __str__(self) -> str:
        return f"{self.command} {self.sub}".upper() if self.sub else self.command.upper()


def rules(texts: Iterable[str]) -> tuple[Rule, ...]:
    """Rules from options that may each list several, comma-separated (`--deny FLUSHALL,CONFIG`)."""
    return tuple(Rule.parse(item) for text in texts for item in text.split(",") if item.strip())


def glob(pattern: str) -> re.Pattern[bytes]:
    """A Redis glob (stringmatchlen: * ? [abc] [^a] [a-z], backslash escapes) as a regex on bytes."""
    out, i, raw = [], 0, pattern.encode()
    while i < len(raw):
        char = raw[i:i + 1]
        if char == b"\\" and i + 1 < len(raw):
            out.append(re.escape(raw[i + 1:i + 2]))
            i += 1
        elif char in (b"*", b"?"):
            out.append(b".*" if char == b"*" else b".")
        elif char == b"[" and b"]" in raw[i + 1:]:
            close = raw.index(b"]", i + 2 if raw[i + 1:i + 2] in (b"^", b"]") else i + 1)
            body = raw[i + 1:close]
            out.append(b"[^" + re.escape(body[1:]).replace(b"\\-", b"-") + b"]" if body.startswith(b"^")
                       else b"[" + re.escape(body).replace(b"\\-", b"-") + b"]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile(b"".join(out), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Policy:
    """The guard's rules; `blocked` says which one blocks a command, or None."""

    deny: tuple[Rule, ...] = ()
    allow: tuple[Rule, ...] = ()
    protect: tuple[re.Pattern[bytes], ...] = ()

    def blocked(self, command: Command) -> str | None:
        if not command.args:
            return None  # an empty command: the server skips it
        first = name(command.args[0])
        denied = _naming(self.deny, first, command)
        if denied is not None:
            return str(denied)
        if self.allow and _naming(self.allow, first, command) is None:
            return f"{shown(command.args[0])} (not allowed)"
        if self.protect and self._touches_protected(command):
            return f"{shown(command.args[0])} (a protected key)"
        return None

    def _touches_protected(self, command: Command) -> bool:
        keys = write_keys(command)
        return keys is None or any(pattern.fullmatch(key) for pattern in self.protect for key in keys)


def _naming(rules: tuple[Rule, ...], first: str, command: Command) -> Rule | None:
    """The first rule naming the command whose name is `first`."""
    return next((rule for rule in rules if rule.command == first and rule.names(command)), None)


def write_keys(command: Command) -> tuple[bytes, ...] | None:
    """The keys a write command touches (none for anything else); None when that cannot be told
    from what was seen: every key, or keys beyond the head."""
    first = name(command.args[0])
    if first in _EVERY_KEY:
        return None
    if first in _MOVING:
        return command.args[1:] if command.complete else None
    spec = _KEYS.get(f"{first}|{name(command.args[1])}" if len(command.args) > 1 else first) or _KEYS.get(first)
    if spec is None:
        return ()
    start, last, step = spec
    stop = last if last > 0 else command.count + last
    if stop >= len(command.args):
        return None
    return command.args[start:stop + 1:step]
