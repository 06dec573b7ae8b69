#!/usr/bin/env python3
"""PyChat: a real-time chat room in one Python file (Python 3.10+, stdlib only).

Commands
    python pychat.py server [--host H] [--port 5050]   start a chat server
    python pychat.py cli [--host H] [--port P] [--nick N]   join from a terminal
    python pychat.py --help                            every subcommand and flag

Wire protocol v1: TCP, one UTF-8 JSON object per line ending in "\\n", every
object has a "type", unknown fields are ignored.  A session looks like this
(C = client, S = server):

    C {"type":"hello","nick":"alice"}
    S {"type":"welcome","nick":"alice","room":"#lobby","server":"PyChat","version":"0.1.0"}
    S {"type":"history","room":"#lobby","messages":[...msg events, oldest first...]}
    S {"type":"users","room":"#lobby","users":["alice","bob"]}
    C {"type":"msg","text":"hi","cid":"k3-1"}
    S {"type":"msg","room":"#lobby","from":"alice","text":"hi","ts":1700000000.5,"id":7,"cid":"k3-1"}
    C {"type":"nick","nick":"alicia"}
    S {"type":"nick","old":"alice","new":"alicia","ts":1700000001.0}
    C {"type":"users"}            S {"type":"users","room":"#lobby","users":[...]}
    C {"type":"ping","data":1}    S {"type":"pong","data":1}     (either direction)
    S {"type":"join","room":"#lobby","nick":"bob","ts":...}
    S {"type":"leave","room":"#lobby","nick":"bob","reason":"quit","ts":...}
    C {"type":"quit","reason":"bye"}
    S {"type":"error","code":"nick_taken","message":"human sentence"}
    S {"type":"bye","reason":"server shutting down"}

README.md holds the full reference.  Sections of this file, each using only
the ones above it:

    1. Constants and limits      4. Client core (ChatClient)
    2. Protocol                  5. Terminal client (run_cli)
    3. Server core               6. Entry point (build_parser, main)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import getpass
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
import unicodedata
import zlib
from typing import Any, Callable

__version__ = "0.1.0"

log = logging.getLogger("pychat")


# ===========================================================================
# 1. Constants and limits -- every number the program relies on, named once.
# ===========================================================================

DEFAULT_PORT = 5050
LOBBY = "#lobby"
SERVER_NAME = "PyChat"

# Server limits (each has a command-line flag of the same name).
HISTORY_LEN = 100              # messages kept per room, oldest dropped first
MAX_LINE_BYTES = 64 * 1024     # one request line; longer ones close the link
MAX_TEXT = 4000                # characters in one chat message
FLOOD_BURST = 20               # token bucket: messages allowed in a burst...
FLOOD_RATE = 5.0               # ...refilled at this many per second
MAX_BACKLOG_BYTES = 1024 * 1024  # unsent bytes a client may owe before we drop it
PING_INTERVAL = 30.0           # ping a client that has been silent this long
PING_TIMEOUT = 20.0            # drop it if it stays silent this much longer

MAX_NICK_LEN = 32
MAX_REASON_LEN = 200           # quit reasons and other short free texts
MAX_CID_LEN = 64               # client message ids are echoed, so keep them short
# A flooder is disconnected once this many requests have been refused faster
# than the bucket refills (a burst of honest typing never gets near it).
FLOOD_KICK = 40

# Client settings.
CLIENT_MAX_LINE = 64 * 1024 * 1024  # history frames can be large; trust the server more
CONNECT_TIMEOUT = 10.0
BACKOFF_START = 0.5            # first reconnect delay; doubles up to BACKOFF_MAX
BACKOFF_MAX = 30.0
KEEPALIVE = 25.0               # client pings the server after this much silence
DEAD_AFTER = 60.0              # no byte from the server for this long: reconnect

# Nick characters refused besides whitespace and control characters: they
# separate targets or prefixes in chat protocols (IRC's nick!user@host, lists).
NICK_FORBIDDEN = set(",!@*?")


# ===========================================================================
# 2. Protocol -- pure functions: bytes in, dicts out, no sockets.  Shared by
#    the server and the client.  Uses: constants.
# ===========================================================================

class ProtocolError(ValueError):
    """A request the peer got wrong; `code` is the stable wire error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# Stable error codes and their default sentences.
ERRORS = {
    "bad_json": "That line is not valid UTF-8 JSON.",
    "bad_request": "A field is missing or has the wrong type.",
    "unknown_type": "Unknown message type.",
    "not_registered": "Say hello with a nick first.",
    "already_registered": "You are already registered; use nick to change your name.",
    "nick_invalid": "That nick is not allowed.",
    "nick_taken": "That nick is already in use.",
    "too_long": "Message too long.",
    "empty": "Message is empty.",
    "rate_limited": "Slow down: you are sending too fast; that message was dropped.",
    "line_too_long": "Line too long; closing the connection.",
    "flooding": "Too many messages; disconnecting.",
    "no_such_room": "No such room.",
    "not_in_room": "You are not in that room.",
}

# Field table: type -> {field: (python type, required)}.  validate() checks
# every request against it before any handler runs.
FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "hello": {"nick": (str, True), "password": (str, False), "client": (str, False)},
    "msg": {"text": (str, True), "room": (str, False), "action": (bool, False),
            "cid": ((str, int), False)},
    "nick": {"nick": (str, True)},
    "users": {"room": (str, False)},
    "ping": {},
    "pong": {},
    "quit": {"reason": (str, False)},
}

_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def encode(obj: dict) -> bytes:
    """One protocol line: compact JSON, UTF-8, newline-terminated."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _clean_surrogates(value: Any) -> Any:
    """Replace lone surrogates (legal in JSON, not in UTF-8) with '?'."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_clean_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_clean_surrogates(k): _clean_surrogates(v) for k, v in value.items()}
    return value


def decode(line: bytes) -> dict:
    """Parse one line (without its newline) into a message dict with a str type."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, absurd nesting or numbers
        raise ProtocolError("bad_json", ERRORS["bad_json"]) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("bad_request", 'Each line must be a JSON object with a "type".')
    if b"\\u" in line:  # only \u escapes can smuggle in a lone surrogate
        obj = _clean_surrogates(obj)
    return obj


def validate(msg: dict) -> None:
    """Check a request's fields against FIELDS; raise ProtocolError if wrong."""
    fields = FIELDS.get(msg["type"])
    if fields is None:
        raise ProtocolError("unknown_type", f"Unknown message type {msg['type'][:40]!r}.")
    for name, (kind, required) in fields.items():
        value = msg.get(name)
        if value is None:
            if required:
                raise ProtocolError("bad_request", f'"{msg["type"]}" needs a "{name}" field.')
        elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ProtocolError("bad_request", f'Field "{name}" has the wrong type.')


def clean_text(text: str) -> str:
    """Strip control characters other than newline and tab; normalise CRLF."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_RE.sub("", text)


def nick_problem(nick: str) -> str | None:
    """Why `nick` is not allowed, or None when it is fine."""
    if not 1 <= len(nick) <= MAX_NICK_LEN:
        return f"A nick has 1 to {MAX_NICK_LEN} characters."
    if nick[0] in "#&:":
        return "A nick may not start with #, & or :."
    for ch in nick:
        if ch.isspace():
            return "A nick may not contain spaces."
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return "A nick may not contain control or invisible characters."
        if ch in NICK_FORBIDDEN:
            return "A nick may not contain any of , ! @ * ?"
    return None


def nick_key(nick: str) -> str:
    """The case-insensitive identity of a nick (or a room name)."""
    return nick.casefold()


def error(code: str, message: str | None = None, **extra: Any) -> dict:
    """An error event with a stable code and a human sentence."""
    return {"type": "error", "code": code, "message": message or ERRORS.get(code, code), **extra}


# ===========================================================================
# 3. Server core -- Room, Session, ChatServer.  Uses: constants, protocol.
#
# Each connection is an asyncio.Protocol (a Session) with its own line
# splitting.  Broadcast encodes an event once and appends the same bytes to
# every member's output list; one callback per event-loop tick writes what
# each session is owed in a single transport.write().  Nothing ever awaits a
# peer: a session whose unsent backlog passes the cap is dropped instead.
# ===========================================================================

class Room:
    """A chat room: its members and a bounded ring buffer of recent messages."""

    def __init__(self, name: str, history: int):
        self.name = name
        self.members: dict[str, Session] = {}  # nick_key -> session
        self.history: collections.deque[dict] = collections.deque(maxlen=history)

    def nicks(self) -> list[str]:
        return sorted((s.nick for s in self.members.values()), key=nick_key)


class Session(asyncio.Protocol):
    """One client connection: framing, flood bucket, output backlog."""

    def __init__(self, server: ChatServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.nick: str | None = None
        self.rooms: dict[str, Room] = {}
        self.inbuf = bytearray()
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.closing = False
        self.leave_reason = "disconnected"
        self.quit_message = ""
        now = server.loop.time()
        self.last_rx = now
        self.pinged_at: float | None = None
        self.tokens = float(server.flood_burst)
        self.token_time = now
        self.flood_penalty = 0.0

    # --- asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.sessions.add(self)
        log.debug("connection from %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.drop(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.server.loop.time()
        self.pinged_at = None
        buf = self.inbuf
        scan_from = len(buf)
        buf += data
        limit = self.server.max_line_bytes
        start = 0
        while not self.closing:
            nl = buf.find(b"\n", max(start, scan_from))
            if nl < 0:
                break
            if nl - start > limit:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            try:
                self.server.handle_line(self, line)
            except Exception:  # a server bug must end only this session
                log.exception("error handling a request from %s", self.peer)
                self.close("error")
        if self.closing:
            return
        del buf[:start]
        if len(buf) > limit:
            self.inbuf = bytearray()
            self.send(encode(error("line_too_long", f"Lines are limited to {limit} bytes; closing.")))
            self.close("line_too_long")

    # --- output
    def send(self, data: bytes) -> None:
        """Queue bytes for this session; they are written at the end of the tick."""
        if self.closing:
            return
        if not self.out:
            self.server.dirty.append(self)
            self.server.schedule_flush()
        self.out.append(data)
        self.out_bytes += len(data)

    def flush(self) -> None:
        """Write what this tick owes in one call; drop a peer that stopped reading."""
        out, self.out, self.out_bytes = self.out, [], 0
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])
            # The transport keeps what the kernel would not take.  Past the cap
            # this peer is not keeping up: cut it rather than buffer for it.
            if transport.get_write_buffer_size() > self.server.max_backlog_bytes:
                self.abort("backlog")

    def close(self, reason: str) -> None:
        """Flush what we owe, then close gracefully."""
        if self.closing:
            return
        self.leave_reason = reason
        self.flush()
        self.closing = True
        self.server.drop(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Close at once, discarding the backlog (slow or hostile peers)."""
        if self.closing:
            return
        self.leave_reason = reason
        self.out.clear()
        self.closing = True
        self.server.drop(self)
        if self.transport is not None:
            self.transport.abort()

    # --- flood control
    def take_token(self, now: float) -> bool:
        """Token bucket: True if this request may go through."""
        rate = self.server.flood_rate
        if rate <= 0:
            return True
        elapsed = now - self.token_time
        self.token_time = now
        self.tokens = min(self.server.flood_burst, self.tokens + elapsed * rate)
        self.flood_penalty = max(0.0, self.flood_penalty - elapsed * rate)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.flood_penalty += 1
        return False


class ChatServer:
    """The rooms, the sessions, the request handlers and the housekeeping task."""

    def __init__(self, *, history: int = HISTORY_LEN, max_line_bytes: int = MAX_LINE_BYTES,
                 max_text: int = MAX_TEXT, flood_burst: int = FLOOD_BURST,
                 flood_rate: float = FLOOD_RATE, max_backlog_bytes: int = MAX_BACKLOG_BYTES,
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                 motd: str | None = None):
        self.history = history
        self.max_line_bytes = max_line_bytes
        self.max_text = max_text
        self.flood_burst = max(1, flood_burst)
        self.flood_rate = flood_rate
        self.max_backlog_bytes = max_backlog_bytes
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.motd = motd
        self.rooms: dict[str, Room] = {nick_key(LOBBY): Room(LOBBY, history)}
        self.nicks: dict[str, Session] = {}     # nick_key -> registered session
        self.sessions: set[Session] = set()     # every open connection
        self.dirty: list[Session] = []          # sessions with output this tick
        self._flush_scheduled = False
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._housekeeper: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.handlers: dict[str, Callable[[Session, dict], None]] = {
            "hello": self.handle_hello,
            "msg": self.handle_msg,
            "nick": self.handle_nick,
            "users": self.handle_users,
            "ping": self.handle_ping,
            "pong": self.handle_pong,
            "quit": self.handle_quit,
        }

    # --- lifecycle
    async def start(self, host: str | None = None, port: int = DEFAULT_PORT) -> int:
        """Listen on host:port (None: every interface); return the port bound."""
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: Session(self), host, port,
                                               reuse_address=True)
        ports = sorted({s.getsockname()[1] for s in server.sockets})
        if port == 0 and len(ports) > 1:
            # Every interface with port 0: IPv4 and IPv6 got different free
            # ports.  Listen again on one of them everywhere.
            server.close()
            await server.wait_closed()
            server = await self.loop.create_server(lambda: Session(self), host, ports[0],
                                                   reuse_address=True)
        self._servers.append(server)
        self._housekeeper = self.loop.create_task(self._housekeeping())
        return server.sockets[0].getsockname()[1]

    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def close(self, reason: str = "server shutting down") -> None:
        """Tell every client goodbye, close every connection, stop listening."""
        self.shutting_down = True
        for srv in self._servers:
            srv.close()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        bye = encode({"type": "bye", "reason": reason})
        sessions = list(self.sessions)
        for s in sessions:
            s.send(bye)
            s.close("shutdown")
        self.flush_all()
        # Give the transports a moment to write the goodbye, then cut.
        deadline = self.loop.time() + 2.0
        while any(not s.transport.is_closing() or s.transport.get_write_buffer_size()
                  for s in sessions if s.transport is not None):
            if self.loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    # --- output batching
    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        """Write what every session is owed: one write per session per tick."""
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for s in dirty:
            s.flush()

    def broadcast(self, room: Room, event: dict) -> None:
        """Send one event to every member of a room, encoded once."""
        data = encode(event)
        for s in room.members.values():
            s.send(data)

    # --- connections
    def drop(self, s: Session) -> None:
        """Forget a session; tell its rooms it left (once)."""
        self.sessions.discard(s)
        if s.nick is None:
            return
        key = nick_key(s.nick)
        if self.nicks.get(key) is s:
            del self.nicks[key]
        log.info("%s (%s) left: %s", s.nick, s.peer, s.leave_reason)
        event = {"type": "leave", "room": "", "nick": s.nick, "reason": s.leave_reason,
                 "ts": round(time.time(), 3)}
        if s.quit_message:
            event["message"] = s.quit_message
        for room in list(s.rooms.values()):
            room.members.pop(key, None)
            if not self.shutting_down:  # at shutdown everyone gets "bye" instead: no O(N^2)
                self.broadcast(room, dict(event, room=room.name))
        s.rooms.clear()
        s.nick = None

    async def _housekeeping(self) -> None:
        """Ping silent clients and drop those that never answer (0 turns it off)."""
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            return
        period = max(0.05, min(self.ping_interval, self.ping_timeout) / 4)
        ping = encode({"type": "ping", "data": "keepalive"})
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for s in list(self.sessions):
                if s.pinged_at is not None:
                    if now - s.pinged_at > self.ping_timeout:
                        s.abort("timeout")
                elif now - s.last_rx > self.ping_interval:
                    s.pinged_at = now
                    s.send(ping)

    # --- requests
    def handle_line(self, s: Session, line: bytes) -> None:
        """Decode, validate and dispatch one request line."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        msg: dict | None = None
        try:
            msg = decode(line)
            kind = msg["type"]
            if s.nick is None and kind not in ("hello", "ping", "pong"):
                raise ProtocolError("not_registered", ERRORS["not_registered"])
            validate(msg)
            if kind != "pong" and not s.take_token(self.loop.time()):
                if s.flood_penalty > FLOOD_KICK:
                    s.send(encode(error("flooding")))
                    s.close("flood")
                    return
                raise ProtocolError("rate_limited", ERRORS["rate_limited"])
        except ProtocolError as e:
            extra: dict[str, Any] = {}
            if msg is not None:
                extra["request"] = msg["type"][:40]
                cid = msg.get("cid")
                if isinstance(cid, (str, int)) and not isinstance(cid, bool):
                    extra["cid"] = cid if isinstance(cid, int) else cid[:MAX_CID_LEN]
            s.send(encode(error(e.code, e.message, **extra)))
            return
        handler = self.handlers[kind]  # looked up outside the try: a bug is not "unknown type"
        handler(s, msg)

    def _reply_error(self, s: Session, msg: dict, code: str, message: str | None = None) -> None:
        extra: dict[str, Any] = {"request": msg["type"]}
        cid = msg.get("cid")
        if cid is not None:
            extra["cid"] = cid if isinstance(cid, int) else cid[:MAX_CID_LEN]
        s.send(encode(error(code, message, **extra)))

    def _check_nick(self, s: Session, msg: dict, nick: str) -> bool:
        problem = nick_problem(nick)
        if problem:
            self._reply_error(s, msg, "nick_invalid", problem)
            return False
        owner = self.nicks.get(nick_key(nick))
        if owner is not None and owner is not s:
            self._reply_error(s, msg, "nick_taken", f"The nick {nick} is already in use.")
            return False
        return True

    def handle_hello(self, s: Session, msg: dict) -> None:
        if s.nick is not None:
            self._reply_error(s, msg, "already_registered")
            return
        nick = msg["nick"]
        if not self._check_nick(s, msg, nick):
            return
        s.nick = nick
        key = nick_key(nick)
        self.nicks[key] = s
        lobby = self.rooms[nick_key(LOBBY)]
        welcome = {"type": "welcome", "nick": nick, "room": lobby.name, "server": SERVER_NAME,
                   "version": __version__,
                   "limits": {"max_text": self.max_text, "max_line_bytes": self.max_line_bytes,
                              "flood_burst": self.flood_burst, "flood_rate": self.flood_rate,
                              "ping_interval": self.ping_interval}}
        if self.motd:
            welcome["motd"] = self.motd
        s.send(encode(welcome))
        log.info("%s joined from %s (client %r)", nick, s.peer, str(msg.get("client", "?"))[:40])
        self._join(s, lobby)

    def _join(self, s: Session, room: Room) -> None:
        assert s.nick is not None
        self.broadcast(room, {"type": "join", "room": room.name, "nick": s.nick,
                              "ts": round(time.time(), 3)})
        room.members[nick_key(s.nick)] = s
        s.rooms[nick_key(room.name)] = room
        s.send(encode({"type": "history", "room": room.name, "messages": list(room.history)}))
        s.send(encode({"type": "users", "room": room.name, "users": room.nicks()}))

    def _room_for(self, s: Session, msg: dict) -> Room | None:
        name = msg.get("room") or LOBBY
        room = self.rooms.get(nick_key(name))
        if room is None:
            self._reply_error(s, msg, "no_such_room", f"There is no room {name[:40]}.")
        elif nick_key(room.name) not in s.rooms:
            self._reply_error(s, msg, "not_in_room", f"You are not in {room.name}.")
            return None
        return room

    def handle_msg(self, s: Session, msg: dict) -> None:
        text = clean_text(msg["text"])
        if not text.strip():
            self._reply_error(s, msg, "empty", "Empty messages are not sent.")
            return
        if len(text) > self.max_text:
            self._reply_error(s, msg, "too_long",
                              f"Messages are limited to {self.max_text} characters.")
            return
        cid = msg.get("cid")
        if isinstance(cid, str) and len(cid) > MAX_CID_LEN:
            self._reply_error(s, msg, "bad_request", f"cid is limited to {MAX_CID_LEN} characters.")
            return
        room = self._room_for(s, msg)
        if room is None:
            return
        event = {"type": "msg", "room": room.name, "from": s.nick, "text": text,
                 "ts": round(time.time(), 3), "id": next(self._ids)}
        if msg.get("action"):
            event["action"] = True
        if cid is not None:
            event["cid"] = cid
        room.history.append(event)
        self.broadcast(room, event)

    def handle_nick(self, s: Session, msg: dict) -> None:
        new = msg["nick"]
        old = s.nick
        assert old is not None
        if new == old or not self._check_nick(s, msg, new):
            return
        del self.nicks[nick_key(old)]
        self.nicks[nick_key(new)] = s
        s.nick = new
        for room in s.rooms.values():
            room.members.pop(nick_key(old))
            room.members[nick_key(new)] = s
        # Everyone who shares a room with her hears it once, and so does she.
        audience = {s}
        for room in s.rooms.values():
            audience.update(room.members.values())
        data = encode({"type": "nick", "old": old, "new": new, "ts": round(time.time(), 3)})
        for member in audience:
            member.send(data)
        log.info("%s is now known as %s", old, new)

    def handle_users(self, s: Session, msg: dict) -> None:
        room = self._room_for(s, msg)
        if room is not None:
            s.send(encode({"type": "users", "room": room.name, "users": room.nicks()}))

    def handle_ping(self, s: Session, msg: dict) -> None:
        s.send(encode({"type": "pong", "data": msg.get("data")}))

    def handle_pong(self, s: Session, msg: dict) -> None:
        pass  # any incoming line already counts as a sign of life

    def handle_quit(self, s: Session, msg: dict) -> None:
        reason = clean_text(msg.get("reason") or "").replace("\n", " ").strip()[:MAX_REASON_LEN]
        s.quit_message = reason
        s.close("quit")


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, found without sending anything."""
    found: list[str] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return found
    for info in infos:
        addr = str(info[4][0])
        if not addr.startswith("127.") and addr not in found:
            found.append(addr)
    return found


async def serve(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C or SIGTERM; return the exit status."""
    server = ChatServer(history=args.history, max_line_bytes=args.max_line_bytes,
                        max_text=args.max_text, flood_burst=args.flood_burst,
                        flood_rate=args.flood_rate, max_backlog_bytes=args.max_backlog_bytes,
                        ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
                        motd=args.motd)
    try:
        port = await server.start(args.host, args.port)
    except OSError as e:
        print(f"pychat: cannot listen on {args.host or '*'}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
    shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.addresses())
    print(f"PyChat {__version__} server listening on {shown} (port {port})", flush=True)
    if args.host in (None, "", "0.0.0.0", "::"):
        lan = lan_addresses()
        where = lan[0] if lan else socket.gethostname() or "<this machine's address>"
        print(f"Friends on your network join with:  python pychat.py cli --host {where} "
              f"--port {port}", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.close()
    return 0


# ===========================================================================
# 4. Client core -- ChatClient: connects, registers, keeps the link alive,
#    reconnects with backoff, and tracks users and unconfirmed messages.
#    Uses: constants, protocol.
#
# UIs call methods; the client answers only with events passed to one
# callback, on_event(dict).  Server events arrive as they are; the client adds
# its own local ones:
#    {"type":"status","state":"connecting"|"connected"|"disconnected","message":...}
#    {"type":"nick_rejected","code":...,"message":...}  (UI must call set_nick)
#    {"type":"failed","cid":...,"text":...,"message":...}  (a message the server refused)
#    {"type":"fatal","message":...}  (gave up; run() returns)
# Every method must be called on the client's event-loop thread.
# ===========================================================================

class ChatClient:
    """The network side of both UIs: one connection, reconnected as needed."""

    def __init__(self, host: str, port: int, nick: str, on_event: Callable[[dict], None], *,
                 client: str = "pychat", history: bool = True, connect_attempts: int = 4,
                 give_up_after: float | None = None):
        self.host, self.port = host, port
        self.nick = nick
        self.on_event = on_event
        self.client_name = client
        self.want_history = history
        self.connect_attempts = connect_attempts
        self.give_up_after = give_up_after   # seconds of failed reconnecting; None: never
        self.room = LOBBY
        self.users: dict[str, str] = {}      # nick_key -> nick, for the current room
        self.outbox: dict[str, dict] = {}    # cid -> msg request, until the echo confirms it
        self.queue: collections.deque[dict] = collections.deque()  # requests not yet written
        self.limits: dict[str, Any] = {}
        self.registered = False
        self.ever_registered = False
        self.closed = False
        self.last_id = 0
        self._cid_prefix = secrets.token_hex(3)
        self._cid_counter = itertools.count(1)
        self._writer: asyncio.StreamWriter | None = None
        self._nick_future: asyncio.Future | None = None
        self._wake = asyncio.Event()         # something was queued
        self._stop = asyncio.Event()         # quit() was called
        self._tokens = 0.0
        self._token_time = 0.0
        self._pump: asyncio.Task | None = None

    # --- public methods (called by UIs)
    def send_msg(self, text: str, action: bool = False) -> str:
        """Queue a chat message; it stays in the outbox until the server echoes it."""
        cid = f"{self._cid_prefix}-{next(self._cid_counter)}"
        req: dict[str, Any] = {"type": "msg", "room": self.room, "text": text, "cid": cid}
        if action:
            req["action"] = True
        self.outbox[cid] = req
        self._enqueue(req)
        return cid

    def change_nick(self, nick: str) -> None:
        self._enqueue({"type": "nick", "nick": nick})

    def request_users(self) -> None:
        self._enqueue({"type": "users", "room": self.room})

    def set_nick(self, nick: str) -> None:
        """Answer a nick_rejected event with another nick to try."""
        self.nick = nick
        if self._nick_future is not None and not self._nick_future.done():
            self._nick_future.set_result(nick)

    def pending(self) -> list[dict]:
        """Messages typed but not yet confirmed by the server, oldest first."""
        return list(self.outbox.values())

    async def wait_sent(self, timeout: float | None = None) -> bool:
        """Wait until everything typed was sent and every message confirmed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (self.outbox or self.queue) and not self.closed:
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        return not self.outbox and not self.queue

    async def quit(self, reason: str = "") -> None:
        """Leave cleanly: say quit, close the connection, end run()."""
        self.closed = True
        writer = self._writer
        if writer is not None and self.registered:
            try:
                writer.write(encode({"type": "quit", "reason": reason}))
                await asyncio.wait_for(writer.drain(), 2)
            except (OSError, asyncio.TimeoutError):
                pass
        self._close_writer()
        if self._nick_future is not None and not self._nick_future.done():
            self._nick_future.cancel()
        self._stop.set()

    # --- internals
    def _emit(self, event: dict) -> None:
        self.on_event(event)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _enqueue(self, req: dict) -> None:
        self.queue.append(req)
        self._wake.set()

    async def _send_queue(self) -> None:
        """Write queued requests in order, paced below the server's flood limit."""
        burst = float(self.limits.get("flood_burst", FLOOD_BURST))
        rate = float(self.limits.get("flood_rate", FLOOD_RATE))
        # Stay a little under the server's bucket so honest bulk input (a piped
        # file) is never refused.
        burst, rate = max(1.0, burst - 2), rate * 0.9
        self._tokens, self._token_time = burst, time.monotonic()
        while self.registered and self._writer is not None:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            while rate > 0:
                now = time.monotonic()
                self._tokens = min(burst, self._tokens + (now - self._token_time) * rate)
                self._token_time = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    break
                await asyncio.sleep((1 - self._tokens) / rate)
            if not self.registered or self._writer is None or not self.queue:
                continue
            req = self.queue.popleft()
            if req["type"] == "msg" and req["cid"] not in self.outbox:
                continue  # confirmed or refused meanwhile
            self._writer.write(encode(req))
            await self._writer.drain()

    async def run(self) -> None:
        """Connect, register, read events; reconnect until quit() or giving up."""
        failures = 0
        backoff = BACKOFF_START
        down_since: float | None = None
        while not self.closed:
            self._emit({"type": "status", "state": "connecting",
                        "message": f"Connecting to {self.host}:{self.port}..."})
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=CLIENT_MAX_LINE),
                    CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                failures += 1
                reason = getattr(e, "strerror", None) or str(e) or "timed out"
                now = time.monotonic()
                down_since = down_since or now
                if not self.ever_registered and failures >= self.connect_attempts:
                    self._fatal(f"Cannot connect to {self.host}:{self.port}: {reason}.")
                    return
                if (self.ever_registered and self.give_up_after is not None
                        and now - down_since > self.give_up_after):
                    self._fatal(f"Lost the server at {self.host}:{self.port} and could not "
                                f"reconnect for {self.give_up_after:.0f} s: {reason}.")
                    return
                self._emit({"type": "status", "state": "disconnected",
                            "message": f"Cannot connect: {reason}. Retrying in {backoff:.1f} s."})
                await self._sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            if self.closed:  # quit() while we were connecting
                writer.close()
                break
            self._writer = writer
            try:
                reason = await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                reason = f"connection lost ({e.__class__.__name__}: {e})"
            finally:
                self.registered = False
                if self._pump is not None:
                    self._pump.cancel()
                    self._pump = None
                self._close_writer()
            if self.closed:
                break
            if reason == "fatal":
                return
            if self.ever_registered:
                failures, backoff, down_since = 0, BACKOFF_START, time.monotonic()
            self._emit({"type": "status", "state": "disconnected",
                        "message": f"Disconnected: {reason}. Reconnecting..."})
            await self._sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
        self._emit({"type": "status", "state": "closed", "message": "Disconnected."})

    def _fatal(self, message: str) -> None:
        self.closed = True
        self._emit({"type": "fatal", "message": message})

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when quit() is called."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read(self, reader: asyncio.StreamReader) -> dict | None:
        """Next event from the server, or None at end of stream."""
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), KEEPALIVE)
            except asyncio.TimeoutError:
                if time.monotonic() - self._last_rx > DEAD_AFTER:
                    raise ConnectionError("the server stopped answering") from None
                self._writer.write(encode({"type": "ping", "data": "keepalive"}))
                continue
            if not line:
                return None
            self._last_rx = time.monotonic()
            if not line.strip():
                continue
            try:
                return decode(line.rstrip(b"\r\n"))
            except ProtocolError:
                continue  # a broken line from the server is skipped, not fatal

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Register on a fresh connection and read events until it ends."""
        self._last_rx = time.monotonic()
        hello = {"type": "hello", "nick": self.nick, "client": self.client_name}
        writer.write(encode(hello))
        rejoin_tries = 0
        while not self.registered:
            event = await self._read(reader)
            if event is None:
                return "the server closed the connection"
            kind = event.get("type")
            if kind == "welcome":
                self.registered = True
            elif kind == "error" and event.get("code") in ("nick_taken", "nick_invalid"):
                if self.ever_registered and event.get("code") == "nick_taken" and rejoin_tries < 20:
                    # Our old connection may still be a ghost on the server
                    # until it times out: try the same nick again shortly.
                    rejoin_tries += 1
                    self._emit({"type": "status", "state": "connecting",
                                "message": f"{event.get('message')} Waiting for it to free up..."})
                    await self._sleep(min(BACKOFF_MAX, 1.0 * rejoin_tries))
                    if self.closed:
                        return "closed"
                    writer.write(encode(hello))
                    continue
                self._nick_future = asyncio.get_running_loop().create_future()
                self._emit({"type": "nick_rejected", "code": event.get("code"),
                            "message": event.get("message", ""), "nick": self.nick})
                try:
                    nick = await self._nick_future
                except asyncio.CancelledError:
                    if self.closed:
                        return "closed"
                    raise
                hello["nick"] = nick
                writer.write(encode(hello))
                continue
            elif kind == "bye":
                return str(event.get("reason") or "the server said bye")
            elif kind == "ping":
                writer.write(encode({"type": "pong", "data": event.get("data")}))
                continue
            else:
                self._emit(event)
                continue
            self._on_welcome(event)
        # Messages written on the last connection but never confirmed go first.
        queued = {id(r) for r in self.queue}
        resend = [r for r in self.outbox.values() if id(r) not in queued]
        self.queue.extendleft(reversed(resend))
        self._pump = asyncio.get_running_loop().create_task(self._send_queue())
        while True:
            event = await self._read(reader)
            if event is None:
                return "the server closed the connection"
            kind = event.get("type")
            if kind == "ping":
                writer.write(encode({"type": "pong", "data": event.get("data")}))
                continue
            if kind == "pong":
                continue
            self._track(event)
            if kind == "bye":
                return str(event.get("reason") or "the server said bye")

    def _on_welcome(self, event: dict) -> None:
        self.nick = str(event.get("nick", self.nick))
        self.room = str(event.get("room", LOBBY))
        limits = event.get("limits")
        self.limits = limits if isinstance(limits, dict) else {}
        first = not self.ever_registered
        self.ever_registered = True
        event = dict(event, first=first)
        self._emit({"type": "status", "state": "connected",
                    "message": f"Connected to {self.host}:{self.port} as {self.nick}."})
        self._emit(event)

    def _track(self, event: dict) -> None:
        """Keep local state (users, nick, outbox, last id) and pass the event on."""
        kind = event.get("type")
        if kind == "history":
            messages = event.get("messages")
            if not isinstance(messages, list):
                return
            # After a reconnect show only what we have not seen yet.
            fresh = [m for m in messages if isinstance(m, dict)
                     and isinstance(m.get("id"), int) and m["id"] > self.last_id]
            if not self.want_history and self.last_id == 0:
                fresh = []
            for m in messages:
                if isinstance(m, dict) and isinstance(m.get("id"), int):
                    self.last_id = max(self.last_id, m["id"])
            event = dict(event, messages=fresh)
        elif kind == "users":
            users = event.get("users")
            if isinstance(users, list):
                self.users = {nick_key(str(u)): str(u) for u in users}
        elif kind == "join":
            nick = str(event.get("nick", ""))
            self.users[nick_key(nick)] = nick
        elif kind == "leave":
            self.users.pop(nick_key(str(event.get("nick", ""))), None)
        elif kind == "nick":
            old, new = str(event.get("old", "")), str(event.get("new", ""))
            self.users.pop(nick_key(old), None)
            self.users[nick_key(new)] = new
            if nick_key(old) == nick_key(self.nick):
                self.nick = new
        elif kind == "msg":
            if isinstance(event.get("id"), int):
                self.last_id = max(self.last_id, event["id"])
            cid = event.get("cid")
            if event.get("from") == self.nick and isinstance(cid, str):
                self.outbox.pop(cid, None)
        elif kind == "error":
            cid = event.get("cid")
            if isinstance(cid, str) and cid in self.outbox:
                if event.get("code") == "rate_limited":
                    self._resend_later(cid)
                    return
                req = self.outbox.pop(cid)
                self._emit({"type": "failed", "cid": cid, "text": req.get("text", ""),
                            "code": event.get("code"), "message": event.get("message", "")})
                return
        self._emit(event)

    def _resend_later(self, cid: str) -> None:
        """The server dropped a paced message anyway: queue it again in a second."""
        def again() -> None:
            req = self.outbox.get(cid)
            if req is not None and req not in self.queue:
                self._enqueue(req)
        asyncio.get_running_loop().call_later(1.0, again)


# ===========================================================================
# 5. Terminal client -- run_cli() and its helpers.  Uses: constants,
#    protocol, client core.  Only this section prints.
#
# A daemon thread reads stdin (through readline where it exists, or a tiny
# msvcrt line editor on Windows) and hands each line to the event loop with
# call_soon_threadsafe.  Incoming lines are printed above the prompt, and the
# prompt plus the partly typed line are drawn again below them.
# ===========================================================================

# ANSI escape sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST),
# other ESC-introduced sequences, then C1 controls.
_ESCAPE_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"       # CSI: cursor moves, colours, clear screen
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?"             # two- and three-byte escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"        # 8-bit CSI
)
_UNSAFE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

NICK_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


def strip_terminal(text: str) -> str:
    """Remove escape sequences and control characters (newlines too) from peer text."""
    return _UNSAFE_RE.sub("", _ESCAPE_RE.sub("", text))


def nick_colour(nick: str) -> int:
    """A stable ANSI colour code for a nick (the same on every machine)."""
    return NICK_COLOURS[zlib.crc32(nick_key(nick).encode("utf-8")) % len(NICK_COLOURS)]


def clock(ts: Any) -> str:
    """HH:MM in local time for an epoch timestamp (now if missing)."""
    try:
        return time.strftime("%H:%M", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return time.strftime("%H:%M")


CLI_HELP = """Commands:
  /nick NEW      change your nick
  /me ACTION     say something in the third person (* alice waves)
  /who           list who is in the room
  /quit [REASON] leave (Ctrl-D and Ctrl-C work too)
  /help          this list
  //text         send a message that starts with a slash"""

COMMANDS = ("/help", "/nick", "/me", "/who", "/quit")


def parse_command(line: str) -> tuple[str, str]:
    """Split a typed line into (command, argument); command "" means plain text."""
    if line.startswith("//"):
        return "", line[1:]
    if line.startswith("/") and len(line) > 1:
        head, _, rest = line[1:].partition(" ")
        return head.lower(), rest.strip()
    return "", line


def complete_nick(prefix: str, nicks: list[str]) -> list[str]:
    """Nicks starting with `prefix`, case-insensitively, sorted."""
    p = nick_key(prefix)
    return sorted((n for n in nicks if nick_key(n).startswith(p)), key=nick_key)


class Terminal:
    """Formats events and prints them above the prompt without garbling input."""

    def __init__(self, out: Any = None, color: bool | None = None, interactive: bool = False):
        self.out = out or sys.stdout
        isatty = hasattr(self.out, "isatty") and self.out.isatty()
        self.color = isatty and not os.environ.get("NO_COLOR") if color is None else color
        self.interactive = interactive and isatty
        self.prompt = "> " if self.interactive else ""
        self.readline: Any = None
        self.editor: WindowsLineEditor | None = None
        self.lock = threading.Lock()
        self.my_nick = ""

    # --- formatting
    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def nick(self, nick: str) -> str:
        return self._c(str(nick_colour(nick)), nick)

    def system(self, ts: Any, text: str) -> str:
        return self._c("2", f"{clock(ts)} -- {strip_terminal(text)}")

    def format_msg(self, m: dict) -> str:
        who = strip_terminal(str(m.get("from", "?")))
        lines = [strip_terminal(part) for part in str(m.get("text", "")).split("\n")]
        body = ("\n" + " " * 6).join(lines)
        mention = bool(self.my_nick) and who != self.my_nick and \
            nick_key(self.my_nick) in nick_key(body)
        if m.get("action"):
            text = f"{clock(m.get('ts'))} * {self.nick(who)} {body}"
        else:
            text = f"{clock(m.get('ts'))} <{self.nick(who)}> {body}"
        return self._c("1", text) if mention else text

    def format_event(self, e: dict) -> str | None:
        """The line(s) to show for an event, or None for events with no display."""
        kind = e.get("type")
        ts = e.get("ts")
        if kind == "msg":
            return self.format_msg(e)
        if kind == "history":
            msgs = [self.format_msg(m) for m in e.get("messages", []) if isinstance(m, dict)]
            if not msgs:
                return None
            return "\n".join([self.system(None, f"last {len(msgs)} messages:"), *msgs,
                              self.system(None, "end of history")])
        if kind == "welcome":
            self.my_nick = str(e.get("nick", ""))
            text = f"You are {e.get('nick')} in {e.get('room')} on {e.get('server')} " \
                   f"{e.get('version')}. Type /help for commands."
            lines = [self.system(ts, text)]
            if e.get("motd"):
                lines.append(self.system(ts, f"MOTD: {e['motd']}"))
            return "\n".join(lines)
        if kind == "users":
            users = [strip_terminal(str(u)) for u in e.get("users", [])]
            return self.system(ts, f"{len(users)} in {e.get('room')}: {', '.join(users)}")
        if kind == "join":
            return self.system(ts, f"{e.get('nick')} joined {e.get('room')}")
        if kind == "leave":
            why = f"{e.get('reason')}: {e['message']}" if e.get("message") else e.get("reason")
            return self.system(ts, f"{e.get('nick')} left {e.get('room')} ({why})")
        if kind == "nick":
            if nick_key(str(e.get("old", ""))) == nick_key(self.my_nick):
                self.my_nick = str(e.get("new", ""))
                return self.system(ts, f"You are now known as {e.get('new')}")
            return self.system(ts, f"{e.get('old')} is now known as {e.get('new')}")
        if kind == "error":
            return self._c("31", f"! {strip_terminal(str(e.get('message', e.get('code'))))}")
        if kind == "failed":
            return self._c("31", f"! Not sent ({strip_terminal(str(e.get('message')))}): "
                                 f"{strip_terminal(str(e.get('text')))[:80]}")
        if kind == "status":
            if e.get("state") == "closed":
                return None
            return self.system(None, str(e.get("message", "")))
        if kind == "bye":
            return self.system(None, f"Server says bye: {e.get('reason')}")
        return None

    # --- output
    def show(self, text: str) -> None:
        """Print lines above the prompt and redraw the prompt and typed text."""
        with self.lock:
            if not self.interactive:
                self.out.write(text + "\n")
                self.out.flush()
                return
            typed = ""
            if self.readline is not None:
                typed = self.readline.get_line_buffer()
            elif self.editor is not None:
                typed = self.editor.buffer()
            up = self._rows(self.prompt + typed) - 1  # a long draft wraps onto more rows
            self.out.write("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J" + text + "\n"
                           + self.prompt + typed)
            self.out.flush()

    def _rows(self, text: str) -> int:
        """Screen rows `text` takes, counting wide (CJK, emoji) characters twice."""
        columns = shutil.get_terminal_size().columns or 80
        width = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
        return max(1, -(-width // columns))

    def erase_typed_line(self, line: str) -> None:
        """Remove the line the user just entered; the server's echo replaces it."""
        if not self.interactive:
            return
        rows = self._rows(self.prompt + line)
        with self.lock:
            self.out.write(f"\r\x1b[{rows}A\x1b[J")
            self.out.flush()


class WindowsLineEditor:
    """A minimal line editor for consoles without readline (Windows' msvcrt)."""

    def __init__(self, term: Terminal):
        import msvcrt  # Windows only; imported here so other systems never need it
        self.msvcrt = msvcrt
        self.term = term
        self.chars: list[str] = []

    def buffer(self) -> str:
        return "".join(self.chars)

    def readline(self) -> str | None:
        """Read one line, echoing it; None on Ctrl-D / Ctrl-Z."""
        out = self.term.out
        with self.term.lock:
            out.write(self.term.prompt)
            out.flush()
        while True:
            ch = self.msvcrt.getwch()
            with self.term.lock:
                if ch in ("\r", "\n"):
                    line, self.chars = self.buffer(), []
                    out.write("\n")
                    out.flush()
                    return line
                if ch == "\x03":
                    raise KeyboardInterrupt
                if ch in ("\x04", "\x1a") and not self.chars:
                    return None
                if ch == "\x08":
                    if self.chars:
                        self.chars.pop()
                        out.write("\b \b")
                elif ch in ("\x00", "\xe0"):
                    self.msvcrt.getwch()  # arrow and function keys: ignored
                elif ch >= " ":
                    self.chars.append(ch)
                    out.write(ch)
                out.flush()


def default_nick() -> str:
    """A nick suggestion from the login name, made valid."""
    try:
        name = getpass.getuser()
    except Exception:  # getuser raises various errors when no name can be found
        name = "guest"
    name = "".join(ch for ch in name if not ch.isspace() and ch not in NICK_FORBIDDEN)
    name = name.lstrip("#&:")[:MAX_NICK_LEN]
    return name if name and nick_problem(name) is None else "guest"


def _restore_terminal() -> Callable[[], None]:
    """Snapshot the tty state so it can be restored however we exit."""
    try:
        import termios  # POSIX only
    except ImportError:
        return lambda: None
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (OSError, ValueError, AttributeError, termios.error):
        saved = None
    if saved is None:
        return lambda: None

    def restore() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except (OSError, termios.error):
            pass
    return restore


async def run_cli(args: argparse.Namespace) -> int:
    """The terminal client: returns the process exit status."""
    restore = _restore_terminal()  # before readline changes the tty modes
    try:
        return await _run_cli(args)
    finally:
        restore()


async def _run_cli(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    term = Terminal(interactive=interactive)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    done = asyncio.Event()
    status = {"code": 0, "awaiting_nick": False, "failed": 0}

    nick = args.nick
    if not nick:
        suggestion = default_nick()
        while interactive and not nick:
            typed = await loop.run_in_executor(None, _ask, f"Nick [{suggestion}]: ")
            if typed is None:  # Ctrl-D at the question
                return 1
            nick = typed.strip() or suggestion
            problem = nick_problem(nick)
            if problem:
                print(f"{problem} Try again.", file=sys.stderr)
                nick = None
        nick = nick or suggestion

    def on_event(event: dict) -> None:
        kind = event.get("type")
        if kind == "nick_rejected":
            if interactive:
                term.show(term._c("31", f"! {strip_terminal(str(event.get('message')))} "
                                        "Type another nick:"))
                status["awaiting_nick"] = True
            else:
                print(f"pychat: {event.get('message')} (nick {event.get('nick')!r}; "
                      "choose another with --nick)", file=sys.stderr)
                status["code"] = 2
                loop.create_task(client.quit())
            return
        if kind == "fatal":
            print(f"pychat: {event.get('message')}", file=sys.stderr)
            status["code"] = 1
            done.set()
            return
        if kind == "failed":
            status["failed"] += 1
        if kind == "status" and not interactive and event.get("state") in ("connecting",
                                                                           "connected"):
            return  # scripts want the chat, not the connection chatter
        text = term.format_event(event)
        if text is not None:
            term.show(text)

    client = ChatClient(args.host, args.port, nick, on_event, client=f"pychat-cli/{__version__}",
                        history=not args.no_history, connect_attempts=args.connect_attempts,
                        give_up_after=None if interactive else 60.0)
    def nicks() -> list[str]:  # called from the stdin thread: copy defensively
        try:
            return list(client.users.values())
        except RuntimeError:
            return []

    _start_input_thread(term, loop, lines, nicks)

    async def input_task() -> None:
        while True:
            line = await lines.get()
            if not interactive:
                # A script's lines follow the server's welcome, and its end of
                # input waits until every line was sent and confirmed.
                await wait_registered()
                if line is None:
                    await client.wait_sent()
            if line is None:  # end of input
                await client.quit("end of input" if not interactive else "")
                return
            if status["awaiting_nick"]:
                problem = nick_problem(line.strip())
                if problem:
                    term.show(term._c("31", f"! {problem} Type another nick:"))
                    continue
                status["awaiting_nick"] = False
                client.set_nick(line.strip())
                continue
            if not await handle_input(line):
                return

    async def wait_registered() -> None:
        while not client.ever_registered and not client.closed:
            await asyncio.sleep(0.02)

    async def handle_input(line: str) -> bool:
        """Act on one typed line; False when the user quits."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return True
        term.erase_typed_line(line)
        cmd, arg = parse_command(line)
        if cmd == "":
            return _send(arg, False)
        if cmd == "me":
            return _send(arg, True) if arg else _usage("/me ACTION")
        if cmd == "nick":
            if not arg:
                return _usage("/nick NEW")
            problem = nick_problem(arg)
            if problem:
                term.show(term._c("31", f"! {problem}"))
            else:
                client.change_nick(arg)
            return True
        if cmd == "who":
            client.request_users()
            return True
        if cmd == "help":
            term.show(CLI_HELP)
            return True
        if cmd in ("quit", "exit"):
            if not interactive:
                await client.wait_sent()
            await client.quit(arg)
            return False
        term.show(term._c("31", f"! Unknown command /{strip_terminal(cmd)}. "
                                "Type /help for the list."))
        return True

    def _usage(text: str) -> bool:
        term.show(term._c("31", f"! Usage: {text}"))
        return True

    def _send(text: str, action: bool) -> bool:
        limit = int(client.limits.get("max_text", MAX_TEXT))
        if len(text) > limit:
            term.show(term._c("31", f"! Not sent: {len(text)} characters, the server allows "
                                    f"{limit}."))
            status["failed"] += 1
            return True
        client.send_msg(text, action)
        if interactive and not client.registered:
            term.show(term.system(None, f"not connected: queued ({len(client.pending())} "
                                        "waiting), sent when the connection is back"))
        return True

    runner = loop.create_task(client.run())
    reader = loop.create_task(input_task())
    waiter = loop.create_task(done.wait())
    try:  # Ctrl-C leaves cleanly; where signal handlers don't exist (Windows)
        loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(client.quit("")))
    except (NotImplementedError, RuntimeError, AttributeError):
        pass  # ...it arrives as KeyboardInterrupt and cmd_cli handles it
    try:
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
        waiter.cancel()
        if not runner.done():
            await client.quit("")
            await asyncio.wait({runner}, timeout=3)
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        if term.interactive:
            term.out.write("\n")  # leave the shell prompt on a line of its own
            term.out.flush()
    if client.outbox:
        print(f"pychat: {len(client.outbox)} message(s) could not be delivered.", file=sys.stderr)
        return status["code"] or 1
    if status["code"] == 0 and status["failed"] and not interactive:
        return 1
    if status["code"] == 0 and not client.ever_registered:
        print("pychat: never got connected.", file=sys.stderr)
        return 1
    return status["code"]


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _start_input_thread(term: Terminal, loop: asyncio.AbstractEventLoop,
                        lines: asyncio.Queue, nicks: Callable[[], list[str]]) -> None:
    """Read stdin in a daemon thread, handing each line to the loop."""
    reader: Callable[[], str | None]
    if term.interactive:
        try:
            import readline
            term.readline = readline
            readline.set_completer_delims(" \t")
            if "libedit" in (readline.__doc__ or ""):
                readline.parse_and_bind("bind ^I rl_complete")
            else:
                readline.parse_and_bind("tab: complete")
            readline.set_completer(_make_completer(nicks, readline.get_begidx))
        except ImportError:
            if sys.platform == "win32":
                term.editor = WindowsLineEditor(term)

    def read_line() -> str | None:
        if term.editor is not None:
            return term.editor.readline()
        if term.interactive:
            try:
                return input(term.prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line if line else None

    reader = read_line

    def pump() -> None:
        while True:
            try:
                line = reader()
            except (KeyboardInterrupt, OSError, ValueError):
                line = None
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # loop closed: we are exiting
                return
            if line is None:
                return

    threading.Thread(target=pump, name="pychat-stdin", daemon=True).start()


def _make_completer(nicks: Callable[[], list[str]],
                    readline_begidx: Callable[[], int] = lambda: 0) -> Callable:
    """A readline completer over the current user list and the slash commands."""
    matches: list[str] = []

    def completer(text: str, state: int) -> str | None:
        if state == 0:
            matches.clear()
            if text.startswith("/"):
                matches.extend(c + " " for c in COMMANDS if c.startswith(text.lower()))
            else:
                # irssi style: "bob: " at the start of a line, "bob " elsewhere.
                at_start = readline_begidx() == 0
                matches.extend(n + (": " if at_start else " ")
                               for n in complete_nick(text, nicks()))
        return matches[state] if state < len(matches) else None

    return completer


# ===========================================================================
# 6. Entry point -- build_parser(), main(argv).  Uses: everything above.
# ===========================================================================

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per program part."""
    parser = argparse.ArgumentParser(
        prog="pychat.py",
        description="PyChat: a chat room in one Python file. Start a server, then join it "
                    "from terminals on the same network.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="quick start:\n"
               "  python pychat.py server              # in one terminal\n"
               "  python pychat.py cli --nick alice    # in each other terminal\n\n"
               "Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"PyChat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    srv = sub.add_parser("server", help="run a chat server",
                         description="Run a PyChat server. Everyone who can reach this machine "
                                     "on PORT can join.")
    srv.add_argument("--host", default=None,
                     help="address to listen on (default: every interface, IPv4 and IPv6)")
    srv.add_argument("--port", type=_port, default=DEFAULT_PORT,
                     help="TCP port; 0 picks a free one and prints it (default: %(default)s)")
    srv.add_argument("--history", type=int, default=HISTORY_LEN, metavar="N",
                     help="messages each room remembers for newcomers (default: %(default)s)")
    srv.add_argument("--max-line-bytes", type=_positive_int, default=MAX_LINE_BYTES, metavar="B",
                     help="longest request line; a client sending more is disconnected (default: %(default)s)")
    srv.add_argument("--max-text", type=_positive_int, default=MAX_TEXT, metavar="N",
                     help="longest chat message, in characters (default: %(default)s)")
    srv.add_argument("--flood-burst", type=_positive_int, default=FLOOD_BURST, metavar="N",
                     help="messages a client may send in a burst (default: %(default)s)")
    srv.add_argument("--flood-rate", type=_non_negative, default=FLOOD_RATE, metavar="R",
                     help="messages per second a client may keep sending; 0 turns flood "
                          "control off (default: %(default)s)")
    srv.add_argument("--max-backlog-bytes", type=_positive_int, default=MAX_BACKLOG_BYTES,
                     metavar="B", help="unsent output a client may owe before it is dropped (default: %(default)s)")
    srv.add_argument("--ping-interval", type=_non_negative, default=PING_INTERVAL, metavar="S",
                     help="ping a client silent for this many seconds (default: %(default)s)")
    srv.add_argument("--ping-timeout", type=_non_negative, default=PING_TIMEOUT, metavar="S",
                     help="drop a pinged client that stays silent this many seconds (default: %(default)s)")
    srv.add_argument("--motd", default=None, help="message of the day shown to everyone who joins")
    srv.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"], help="how much to log (default: %(default)s)")
    srv.set_defaults(func=cmd_server)

    cli = sub.add_parser("cli", help="chat from this terminal",
                         description="Join a PyChat server from the terminal. Lines you type are "
                                     "sent; /help lists the commands. With piped input every "
                                     "line is sent and the client exits when input ends.")
    cli.add_argument("--host", default="localhost", help="server address (default: %(default)s)")
    cli.add_argument("--port", type=_port, default=DEFAULT_PORT, help="server port (default: %(default)s)")
    cli.add_argument("--nick", default=None,
                     help="your nick (default: asked for, or your login name when piped)")
    cli.add_argument("--no-history", action="store_true",
                     help="do not show the room's recent messages on joining")
    cli.add_argument("--connect-attempts", type=_positive_int, default=4, metavar="N",
                     help="tries before giving up on the first connection (default: %(default)s)")
    cli.set_defaults(func=cmd_cli)
    return parser


def cmd_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.history < 0:
        print("pychat: --history must be 0 or more", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:  # Windows: no signal handlers
        return 0


def cmd_cli(args: argparse.Namespace) -> int:
    if args.nick is not None:
        problem = nick_problem(args.nick)
        if problem:
            print(f"pychat: bad --nick {args.nick!r}: {problem}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(run_cli(args))
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a subcommand; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
