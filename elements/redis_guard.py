"""redis_guard: blocks Redis commands by name, however they are spelled or split.

    python -m elements.redis_guard --port 50054 --deny FLUSHALL,CONFIG --deny 'SCRIPT FLUSH'
    python -m elements.redis_guard --port 50054 --allow GET,SET,PING,MULTI,EXEC --protect-key 'config:*'

It reads the client's commands as the server does (elements/resp.py: RESP arrays and inline
commands, pipelined, split anywhere), so `flushall`, `FlushAll`, `"FLUSH\\x41LL"` inline, the
array form and a command split across writes are all the same FLUSHALL. `--deny` blocks the
commands (or `COMMAND SUBCOMMAND`s) it lists; with `--allow`, everything it does not list is
blocked too; `--protect-key PATTERN` blocks write commands on keys matching the Redis glob
(elements/redis_rules.py says how keys are found and what no key rule can see). Options
repeat and take comma-separated lists.

A blocked command never reaches the server: it is rewritten, in place, into a command the
server rejects itself, named `<COMMAND> blocked by element-proxy (redis_guard)`. So the
client gets `-ERR unknown command 'FLUSHALL blocked by element-proxy (redis_guard)', ...`
in order with the replies around it, the connection stays usable, and inside MULTI the
server flags the transaction and EXEC answers -EXECABORT, as for any command it rejects.
A large value is judged by the command's head and streams through. Replies are never
looked at. Bytes that do not follow the protocol get the error the server would give, and
the connection is closed; a connection under way when this guard started is reset, since
where its commands begin is unknown. `Process` shows what happens to a command given as
text: `grpcurl -d '{"text": "FLUSHALL\\r\\n"}' ... element.v1.Element/Process`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Self

from elements.redis_rules import Policy, glob, rules
from elements.resp import Command, Resp
from elements.sdk import Close, Connection, Direction, Element, FramingError, Message, Pass, Reset, Verdict, run

log = logging.getLogger("elements.redis_guard")
SCRIPTING = ("EVAL", "EVALSHA", "FCALL")


class RedisGuard(Element):
    """Inline, requests only, framed as RESP commands."""

    name = "redis_guard"
    directions = (Direction.REQUEST,)
    framing = {Direction.REQUEST: Resp}

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--deny", action="append", default=[], metavar="CMD[,CMD...]", help="block these commands")
        add("--allow", action="append", default=[], metavar="CMD[,CMD...]", help="block every other command")
        add("--protect-key", action="append", default=[], metavar="GLOB", help="block writes to these keys")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        policy = Policy(rules(args.deny), rules(args.allow), tuple(glob(p) for p in args.protect_key))
        if not (policy.deny or policy.allow or policy.protect):
            raise ValueError("nothing to block: give --deny, --allow or --protect-key")
        open_scripts = [s for s in SCRIPTING if policy.blocked(Command((s.encode(), b"0"), 2)) is None]
        if open_scripts:
            log.warning("scripts (%s) can run any command and build key names at run time, which no rule here "
                        "can see: deny them where that matters", ", ".join(open_scripts))
        return cls(policy)

    def on_message(self, conn: Connection, message: Message[Command]) -> Verdict | None:
        blocked = self.policy.blocked(message.info)
        if blocked is None:
            return None
        return Pass(rejected(f"{blocked} blocked by element-proxy ({self.name})"))

    def on_framing_error(self, conn: Connection, error: FramingError) -> Verdict:
        if error.resumed:
            return Reset()
        return Close(reply=f"-ERR {error.problem} (element-proxy {self.name})\r\n".encode())


def rejected(command_name: str) -> bytes:
    """A one-word command the server answers with `-ERR unknown command '<command_name>'`."""
    raw = command_name.encode()
    return b"*1\r\n$%d\r\n%s\r\n" % (len(raw), raw)


if __name__ == "__main__":
    run(RedisGuard)
