#!/usr/bin/env python3
"""PyChat: a real-time chat room in one Python file (Python 3.10+, stdlib only).

Commands
    python pychat.py server [--host H] [--port 5050]   start a chat server
                                                       (and open http://ADDR:5050 in a browser)
    python pychat.py gui [--host H] [--port P] [--nick N]   open the desktop client
    python pychat.py cli [--host H] [--port P] [--nick N]   join from a terminal
    python pychat.py bench [--clients N [N ...]]       how many people this machine can host
    python pychat.py make-ding [PATH]                  write the notification chime
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
    S {"type":"users_delta","room":"#lobby","joined":["carol"],"left":[{"nick":"bob",
       "reason":"quit"}],"ts":...}   (instead of join/leave, to a hello with
                                      "features":["users_delta"])
    C {"type":"quit","reason":"bye"}
    S {"type":"error","code":"nick_taken","message":"human sentence"}
    S {"type":"bye","reason":"server shutting down"}

README.md holds the full reference.  Sections of this file, each using only
the ones above it:

    1. Constants and limits      5. Sound (make_ding, Notifier)
    2. Protocol                  6. Terminal client (run_cli)
    3. Server core               7. GUI client (ChatWindow, run_gui)
    3b. IRC gateway (IrcWire)    7b. Desktop launcher (install-desktop)
    3c. Web gateway (HttpWire,   8. Benchmark (bench)
        WebWire, the page)       8b. QR code (qr_matrix, qr_text)
    4. Client core (ChatClient)  9. Entry point (build_parser, main)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import codecs
import collections
import dataclasses
import datetime
import errno
import functools
import gc
import getpass
import hashlib
import hmac
import http
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import plistlib
import queue
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import wave
import zlib
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterator, Mapping

__version__ = "0.1.0"

log = logging.getLogger("pychat")


def _run_as_module() -> None:
    """`python pychat.py ...` keeps this file's whole syntax tree (about 30 MiB)
    alive until the program ends: CPython frees a script's tree only after
    running it.  An imported module's tree is freed once compiled.  So on
    POSIX the script replaces itself (same process, same arguments and
    interpreter options) with the interpreter importing this file as a module.
    Elsewhere, or if that fails, it simply runs on as it is."""
    script = Path(sys.argv[0])
    name = script.stem
    if os.name != "posix" or not name.isidentifier() or not script.is_file() or \
            script.resolve() != Path(__file__).resolve() or \
            sys.argv[0] not in getattr(sys, "orig_argv", ()):
        return
    start = sys.orig_argv.index(sys.argv[0])
    shim = ("import runpy, sys; sys.argv.pop(0); sys.path.insert(0, sys.argv[0].rpartition("
            f"'/')[0] or '.'); runpy.run_module({name!r}, run_name='__main__', alter_sys=True)")
    # A server needs nothing outside the standard library, so it starts
    # without the site module (-S): no site-packages, no .pth files, whose
    # imports would otherwise stay in memory as long as the server runs.
    no_site = ["-S"] if sys.argv[1:2] == ["server"] and not sys.flags.no_site else []
    try:
        sys.stdout.flush()
        os.execv(sys.executable, [*sys.orig_argv[:start], *no_site, "-c", shim, *sys.argv])
    except OSError:
        pass  # run on as a script


if __name__ == "__main__" and __spec__ is None:  # started as a script, not imported
    _run_as_module()


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

# Latency under load (issue 18): how long one event-loop tick may handle
# requests before it writes what they produced.  Past it, sessions stop
# reading (their kernel buffers hold the rest, so senders feel TCP
# backpressure) until the tick's output is written, then go on.  Measured:
# with no bound, one 256 KiB read of an open-loop sender (thousands of
# lines) kept every message in it waiting up to 120 ms for the tick's writes,
# and a long tick let the next read grow longer still.  Shorter ticks cost
# throughput (fewer messages per write): 10 ms lost a third of it at 1,000
# members, 25 ms about none.
TICK_SECONDS = 0.025
# Joins and leaves in a room are written together (one users_delta, or one
# buffer of join/leave lines, per member), at most this often per member of
# the room: writing them costs a write per member, so a storm of joins into a
# room of 10,000 is written every 0.5 s rather than every tick.  Anything else
# said in the room writes them first, so nothing is ever seen out of order.
PRESENCE_SECONDS_PER_MEMBER = 50e-6
PRESENCE_MAX_DELAY = 1.0

MAX_NICK_LEN = 32
MAX_REASON_LEN = 200           # quit reasons and other short free texts
MAX_CID_LEN = 64               # client message ids are echoed, so keep them short
MAX_CID_INT = 2 ** 53          # ...and integer ones exact in every JSON reader
MAX_PING_DATA = 256            # bytes of ping data echoed back in a pong
MAX_TAG_BYTES = 4094           # client tags on one message (IRCv3 message-tags)
REGISTER_TIMEOUT = 60.0        # seconds from connecting to a nick (time to type a password)
MAX_ROOM_LEN = 33              # "#" plus 1 to 32 visible characters
MAX_TOPIC = 300                # characters in a room topic
MAX_ROOMS = 1000               # rooms on one server...
MAX_ROOMS_PER_USER = 50        # ...and rooms one user may be in
MAX_AWAY = 200                 # characters in an away message
TLS_HANDSHAKE_TIMEOUT = 10.0   # a TLS client that never finishes the handshake is cut
# Wrong passwords from one address: answers are delayed from the AUTH_SLOW_AFTER-th
# failure on (doubling up to AUTH_MAX_DELAY s); from the AUTH_BLOCK_AFTER-th the address
# is refused for AUTH_BLOCK_SECONDS.  Forgotten after AUTH_FORGET s without failures.
AUTH_SLOW_AFTER = 3
AUTH_MAX_DELAY = 8.0
AUTH_BLOCK_AFTER = 10
AUTH_BLOCK_SECONDS = 300.0
AUTH_FORGET = 600.0
TYPING_EVERY = 3.0             # a client says "typing" at most this often...
TYPING_RELAY_MIN = 2.0         # ...and the server relays at most one per this interval
# A flooder is disconnected once this many requests have been refused faster
# than the bucket refills (a burst of honest typing never gets near it).
FLOOD_KICK = 40
# Reliability (issue 6).
MAX_CLIENTS = 10_000           # connections one server accepts (--max-clients)
MAX_PER_ADDRESS = 50           # concurrent connections from one address...
CONNECT_BURST = 30             # ...and new ones: a bucket of this many,
CONNECT_RATE = 2.0             # refilled at this many per second
CID_MEMORY = 500               # message ids (cid) remembered per nick, to drop resends
CID_FORGET = 600.0             # ...for this long after the nick was last seen
ID_BLOCK = 1000                # message ids reserved on disk ahead of use
FSYNC_EVERY = 1.0              # --fsync second: seconds between fsyncs
MAX_LOG_MB = 16.0              # a room log past this is compacted to its history
# File transfer (issue 7).
MAX_FILE_SIZE = 100 * 1024 * 1024  # --max-file-size; 0 turns transfers off
FILE_CHUNK = 32 * 1024         # bytes per chunk line (base64 keeps it under 64 KiB)
FILE_WINDOW = 16               # chunks a sender may have unacknowledged per receiver
MIN_FREE_CHUNK = 4096          # smaller chunks (but a file's last) pay flood tokens
MAX_TRANSFERS = 5              # files one user may be sending at a time...
MAX_OFFERS = 20                # ...and offers one user may have open
FILE_OFFER_TTL = 600.0         # an offer nobody is receiving expires after this long
MAX_FILE_NAME = 200            # characters kept of a file name
# Hardening (issue 14): every resource a client can make the server hold is
# capped here and charged to that client (see the server section's banner).
HISTORY_GRACE = 4 * 1024 * 1024  # unread history replies a session may owe beyond its backlog cap...
MAX_GRACE_TOTAL = 64 * 1024 * 1024  # ...and all sessions together
MAX_HISTORY_MB = 64.0          # every room's history together; the oldest message goes first
MAX_ROOMS_PER_ADDRESS = 20     # rooms that one address made and that still exist
MAX_HANDSHAKES = 64            # TLS handshakes in progress at once (each holds ~40 KiB)
MAX_RESEND_ENTRIES = 50_000    # message ids kept for resends, all users together
LOG_BURST = 20                 # log lines one connection can cause in a burst...
LOG_RATE = 0.2                 # ...and then per second
ROOM_KEEP = 300.0              # a room's log outlives its last member this long (--data-dir)
MAX_OPEN_LOGS = 32             # room logs kept open at once (--data-dir)
ACCEPT_ERROR_EVERY = 10.0      # out of file descriptors: say so at most this often
REFUSE_WAIT = 0.5              # a refused connection waits this long for its first line
WEB_HEAD_TIMEOUT = 5.0         # an HTTP request's head must be in this long after connecting
CLOSE_LINGER = 2.0             # a half-closed connection (Wire.linger) waits this for its peer

# LAN discovery (section 3d).
DISCOVERY_PORT = 5051          # UDP: servers answer "who is there?" here...
DISCOVERY_GROUP = "ff02::5051"  # ...sent to IPv4 broadcast or this IPv6 link-local group
DISCOVERY_QUERY_BYTES = 512    # a query is padded to this; no answer is longer than its query
DISCOVERY_BURST = 5            # answers one source address may get at once...
DISCOVERY_RATE = 1.0           # ...and then this many per second
DISCOVERY_SOURCES = 256        # source addresses remembered for that (oldest forgotten)
DISCOVERY_ANSWERS_PER_SECOND = 50  # answers to everyone together
DISCOVERY_MAX_FOUND = 64       # servers a finder lists at most
FIND_SECONDS = 2.0             # how long `find` (and cli/gui without --host) listen

# After a burst of this many connects and disconnects has been quiet for
# TRIM_DELAY seconds, the server hands the heap memory it freed back to the OS.
TRIM_CHURN = 200
TRIM_DELAY = 2.0
TRIM_SETTLED = 2 * TRIM_DELAY + 0.5  # the latest a burst's trim can come after its end

# The server link (section 3e): what a hub can make a leaf hold, and timing.
MAX_REMOTE_USERS = 50000       # people on other servers shown here (the rest: counted)
MAX_REMOTE_ROOMS = 1000        # rooms the network may make here (its channels)
MAX_REMOTE_ROOMS_PER_USER = 100  # rooms one remote user is shown in
MAX_REMOTE_MEMBERSHIPS = 250000  # remote users' places in rooms, all together (~300 B each)
MAX_HIDDEN_NICKS = 200000      # nicks of the network's people past the cap (~100 B each)
MAX_LINK_SERVERS = 1000        # servers of the network it keeps track of
LINK_MAX_PENDING = 16 * 1024   # bytes of an unfinished line from the hub: past it, cut
LINK_MAX_BACKLOG = 8 * 1024 * 1024  # unsent bytes to a hub that stopped reading: cut
LINK_PING_EVERY = 30.0         # ping the hub (and measure the lag) this often
LINK_TIMEOUT = 90.0            # no answer to a ping for this long: the link is dead
LINK_MAX_HELD = 1000           # messages said while the hub bursts, sent after it
LINK_HANDSHAKE_TIMEOUT = 30.0  # from connecting to the end of the hub's burst
NETJOIN_QUIET = 0.5            # a linking server's people: one line once they stop
NETJOIN_WAIT = 3.0             # (or after this long at most)
LINK_RETRY_FIRST = 1.0         # reconnect backoff: doubles up to LINK_RETRY_MAX
LINK_RETRY_MAX = 60.0
LINK_STABLE = 60.0             # a link that lasted this long starts the backoff afresh

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

class PyChatError(Exception):
    """Something the user must fix (a bad option, an unreadable file): the
    entry point prints it as one line and exits non-zero.  Anything else that
    escapes is a bug and keeps its traceback."""


class ProtocolError(PyChatError, ValueError):
    """A request the peer got wrong; `code` is the stable wire error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# Stable error codes and their default sentences.
ERRORS = {
    "bad_json": "That line is not valid UTF-8 JSON (or it names a field twice).",
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
    "room_invalid": "A room name is # and 1 to 32 visible characters.",
    "too_many_rooms": "Too many rooms.",
    "no_such_nick": "Nobody has that nick.",
    "auth_failed": "Wrong or missing password.",
    "auth_blocked": "Too many wrong passwords from your address; try again later.",
    "not_operator": "Only operators can do that.",
    "banned": "You are banned from this server.",
    "muted": "You are muted: your messages are not delivered.",
    "server_full": "The server is full; try again later.",
    "too_many_connections": "Too many connections from your address.",
    "connecting_too_fast": "Too many new connections from your address; wait a little.",
    "storage_failed": "The server could not save your message, so it was not sent.",
    "file_too_big": "That file is bigger than this server allows.",
    "too_many_transfers": "You are offering too many files at once.",
    "transfers_disabled": "This server does not relay files.",
    "no_such_transfer": "No such file transfer.",
    "file_window": "File chunks must wait for acknowledgements.",
    "history_pending": "The last history of that room has not reached you yet.",
    "bad_tags": "Tags are a JSON object of short strings (4,094 bytes in all).",
    "unreachable": "That person is on a server that is not linked right now (a netsplit).",
    "remote_user": "That person is on another server of the network.",
    "banned_from_room": "The network's operators banned you from that room.",
}

# Field table: type -> {field: (python type, required)}.  validate() checks
# every request against it before any handler runs.
FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "hello": {"nick": (str, True), "password": (str, False), "client": (str, False),
              "token": (str, False), "after": (dict, False), "instance": (str, False),
              "features": (list, False)},
    "msg": {"text": (str, True), "room": (str, False), "action": (bool, False),
            "notice": (bool, False), "tags": (dict, False), "cid": ((str, int), False)},
    "nick": {"nick": (str, True)},
    "users": {"room": (str, False)},
    "ping": {},
    "pong": {},
    "quit": {"reason": (str, False)},
    "typing": {"room": (str, False)},
    "join": {"room": (str, True), "after": (int, False)},
    "history": {"room": (str, True), "after": (int, False)},
    "file_offer": {"name": (str, True), "size": (int, True), "sha256": (str, True),
                   "room": (str, False), "to": (str, False), "cid": ((str, int), False)},
    "file_accept": {"id": (str, True)},
    "file_decline": {"id": (str, True)},
    "file_chunk": {"id": (str, True), "to": (str, True), "seq": (int, True),
                   "data": (str, True)},
    "file_ack": {"id": (str, True), "seq": (int, True)},
    "file_done": {"id": (str, True), "to": (str, True)},
    "file_received": {"id": (str, True), "ok": (bool, True), "reason": (str, False)},
    "file_cancel": {"id": (str, True), "to": (str, False), "reason": (str, False)},
    "part": {"room": (str, True), "reason": (str, False)},
    "rooms": {},
    "topic": {"room": (str, True), "topic": (str, False)},
    "pm": {"to": (str, True), "text": (str, True), "action": (bool, False),
           "notice": (bool, False), "ctcp": (bool, False), "tags": (dict, False),
           "cid": ((str, int), False)},
    "tagmsg": {"tags": (dict, True), "room": (str, False), "to": (str, False)},
    "away": {"message": (str, False)},
    "back": {},
    "op": {"password": (str, True)},
    "auth": {"password": (str, True)},
    "kick": {"nick": (str, True), "reason": (str, False), "room": (str, False)},
    "mode": {"room": (str, True), "nick": (str, True), "op": (bool, True)},
    "ban": {"nick": (str, True), "reason": (str, False), "minutes": ((int, float), False)},
    "unban": {"nick": (str, True)},
    "mute": {"nick": (str, True), "reason": (str, False)},
    "unmute": {"nick": (str, True)},
    "whois": {"nick": (str, True)},
    "stats": {},
}

_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A client tag's name: "+", an optional vendor (a host name) and "/", then
# letters, digits and hyphens (IRCv3 message-tags).
_TAG_NAME = re.compile(r"\+(?:[A-Za-z0-9.-]{1,63}/)?[A-Za-z0-9-]{1,64}")


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """JSON objects with a key twice are refused: parsers disagree on which
    one wins, and a check on one copy must not let the other through."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice")
    return obj


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python-only extensions


# One decoder for every line: json.loads with options builds a new decoder and
# scanner per call, which costs time and leaves small blocks all over the heap.
_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_no_duplicates)


def decode(line: bytes) -> dict:
    """Parse one line (without its newline) into a message dict with a str type."""
    try:
        obj = _DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, absurd nesting or numbers
        raise ProtocolError("bad_json", ERRORS["bad_json"]) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("bad_request", 'Each line must be a JSON object with a "type".')
    # Only \u escapes can smuggle in a lone surrogate.  (One byte first: a
    # search for two is ten times slower, and a 32 KiB file chunk has no "\\".)
    if b"\\" in line and b"\\u" in line:
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


# --- nicks and room names: which are allowed, and when two are the same
# Latin letters that look like another Latin letter but that NFKC leaves alone
# (UTS #39's confusables, the few that matter for Latin nicks): the small
# capitals (ᴀ looks like a), dotless i and j, and the IPA alpha and script g.
# Long s (ſ), fullwidth (ａ) and mathematical letters (𝐚) are already folded by
# NFKC.  Other scripts are kept apart by the mixed-script rule in nick_problem.
_LOOKALIKE_FOLD = str.maketrans("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘꞯʀꜱᴛᴜᴠᴡʏᴢıȷɑɡ",
                                "abcdefghijklmnopqrstuvwyzijag")
# Scripts whose letters pass for each other's (а/a, ο/o, р/p, ν/v): a nick may
# use one of them, not two.  The stdlib has no script property; the first word
# of a letter's Unicode name is the script for these three.
_LOOKALIKE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")


def _letter_scripts(nick: str) -> set[str]:
    """Which of _LOOKALIKE_SCRIPTS the letters of `nick` come from (after NFKC,
    so a fullwidth or mathematical Latin letter counts as Latin)."""
    scripts = set()
    for ch in unicodedata.normalize("NFKC", nick):
        if ch.isalpha():
            script = unicodedata.name(ch, "").split(" ", 1)[0]
            if script in _LOOKALIKE_SCRIPTS:
                scripts.add(script)
    return scripts


def nick_problem(nick: str) -> str | None:
    """Why `nick` is not allowed, or None when it is fine."""
    if not 1 <= len(nick) <= MAX_NICK_LEN:
        return f"A nick has 1 to {MAX_NICK_LEN} characters."
    if nick[0] in "#&:/":
        return "A nick may not start with #, &, : or /."
    for ch in nick:
        if ch.isspace():
            return "A nick may not contain spaces."
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return "A nick may not contain control or invisible characters."
        if ch in NICK_FORBIDDEN:
            return "A nick may not contain any of , ! @ * ?"
    if not nick.isascii() and len(_letter_scripts(nick)) > 1:
        return "A nick may not mix Latin, Cyrillic and Greek letters (they look alike)."
    return None


def room_problem(name: str) -> str | None:
    """Why `name` is not a valid room name, or None."""
    if not name.startswith("#") or not 2 <= len(name) <= MAX_ROOM_LEN:
        return "A room name is # followed by 1 to 32 characters, like #dev."
    for ch in name[1:]:
        if ch.isspace() or ch == "," or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co",
                                                                      "Cn"):
            return "A room name may not contain spaces, commas or invisible characters."
    return None


def nick_key(nick: str) -> str:
    """The identity of a nick (or a room name): two nicks with the same key are
    the same nick.  Case-insensitive, and blind to look-alike spellings: NFKC
    (fullwidth and other compatibility forms), case folding, then the small
    confusables fold above, and a dot above i or j (invisible) is dropped."""
    if nick.isascii():  # nearly every nick: the fast path, same answer
        return nick.lower()
    key = unicodedata.normalize("NFKC", nick).casefold().translate(_LOOKALIKE_FOLD)
    return unicodedata.normalize("NFC", key.replace("i\u0307", "i").replace("j\u0307", "j"))


def users_delta(room: str, events: list[dict]) -> dict:
    """One users_delta event for a run of join and leave events in a room
    (a client that said "features": ["users_delta"] in its hello gets this
    instead of them).  Applied as: remove everyone in "left", then add
    everyone in "joined"; so a nick that left and came back is in both, and
    one that came and went within the run is in neither."""
    first: dict[str, dict] = {}
    last: dict[str, dict] = {}
    for e in events:
        key = nick_key(e["nick"])
        first.setdefault(key, e)
        last[key] = e
    joined = [e for e in last.values() if e["type"] == "join"]
    delta: dict[str, Any] = {
        "type": "users_delta", "room": room, "joined": [e["nick"] for e in joined],
        "left": [{k: e[k] for k in ("nick", "reason", "message", "by") if k in e}
                 for e in first.values() if e["type"] == "leave"],
        "ts": events[-1]["ts"] if events else round(time.time(), 3)}
    away = {e["nick"]: e["away"] for e in joined if e.get("away") is not None}
    if away:
        delta["away"] = away
    via = {e["nick"]: e["via"] for e in joined if e.get("via")}
    if via:
        delta["via"] = via
    return delta


def error(code: str, message: str | None = None, **extra: Any) -> dict:
    """An error event with a stable code and a human sentence."""
    return {"type": "error", "code": code, "message": message or ERRORS.get(code, code), **extra}


# --- TLS (the ssl module is imported only where TLS is asked for)
def server_tls_context(certfile: str, keyfile: str | None = None) -> Any:
    """A server context with modern defaults: TLS 1.2 or newer."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def certificate_fingerprint(certfile: str) -> str:
    """The SHA-256 of a PEM file's first certificate, as lowercase hex: what
    discovery announces and a client pins (trust on first use)."""
    import ssl
    pem = Path(certfile).read_text(encoding="ascii", errors="replace")
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError(f"{certfile} holds no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(pem[start:end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()


def client_tls_context(cafile: str | None = None, insecure: bool = False) -> Any:
    """A client context that verifies the server against the system store or
    `cafile`; `insecure` skips verification (encrypted, but anyone could be there)."""
    import ssl
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fingerprint_text(fingerprint: str) -> str:
    """A SHA-256 fingerprint as people compare them: AB:CD:..."""
    return ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2)).upper()


def pinned_tls_context(fingerprint: str) -> Any:
    """A client context that accepts exactly the certificate with this SHA-256
    (ChatClient checks it after the handshake): for a server found on the LAN
    whose certificate the user trusted on first use."""
    ctx = client_tls_context(insecure=True)
    ctx.pinned_sha256 = fingerprint
    return ctx


def trust_found(found: Any, settings: dict, ask: Callable[[str], bool]) -> Any:
    """The TLS context for connecting to a server discovery found (None
    without TLS).  Trust on first use: the first time, `ask` shows the
    certificate's fingerprint and the answer is kept in settings (saving
    them is the caller's); a different certificate later is refused, loudly.
    PyChatError with a sentence when not connecting."""
    trusted = settings.setdefault("trusted_certificates", {})
    if not found.tls:
        if found.address in trusted:  # a forged answer must not get the password in clear
            raise PyChatError(
                f"WARNING: {found.name} at {found.address} now says it has no TLS, but you "
                "trusted a TLS certificate there. Someone may be pretending to be it, so "
                "PyChat will not connect. If its owner really turned TLS off, remove "
                f"{found.address} from trusted_certificates in settings.json.")
        return None
    fp = found.fingerprint
    if not fp:
        raise PyChatError(f"{found.name} at {found.address} uses TLS but announced no "
                          "certificate fingerprint; connect with --host, --tls and --cafile.")
    known = trusted.get(found.address)
    if known is not None and known != fp:
        raise PyChatError(
            f"WARNING: {found.name} at {found.address} now shows a different TLS "
            f"certificate from the one you trusted (was {fingerprint_text(known)}, now "
            f"{fingerprint_text(fp)}). Someone may be pretending to be it, so PyChat will "
            "not connect. If its owner really changed the certificate, remove "
            f"{found.address} from trusted_certificates in settings.json.")
    if known is None:
        if not ask(f"{found.name} at {found.address} uses TLS. Its certificate's SHA-256 "
                   f"is\n  {fingerprint_text(fp)}\nIt should match what the server printed "
                   "when it started. Trust this certificate?"):
            raise PyChatError(f"Not connecting to {found.address}: its certificate was not "
                              "trusted.")
        trusted[found.address] = fp
    return pinned_tls_context(fp)


INSECURE_WARNING = ("WARNING: --insecure: the connection is encrypted but the server's "
                    "identity is NOT checked; anyone in between could read everything.")


def tls_from_args(args: Any) -> Any:
    """The client TLS context that --tls/--cafile/--insecure ask for, or None;
    PyChatError with a sentence for a bad --cafile.  (main() prints
    INSECURE_WARNING for --insecure.)"""
    if not (args.tls or args.cafile or args.insecure):
        return None
    try:
        return client_tls_context(args.cafile, args.insecure)
    except OSError as e:  # missing file, or not a certificate (ssl.SSLError)
        raise PyChatError(f"cannot use --cafile {args.cafile}: {e}") from None


def _is_tls_error(e: BaseException) -> bool:
    import ssl
    return isinstance(e, ssl.SSLError)


def tls_problem(e: BaseException) -> str:
    """A sentence for a TLS failure."""
    import ssl
    if isinstance(e, ssl.SSLError) and e.args[:1] == ("pinned",):
        return e.args[1]
    if isinstance(e, ssl.SSLCertVerificationError):
        if "mismatch" in str(e.verify_message).lower():
            return (f"the server's certificate is not for this address ({e.verify_message}). "
                    "Connect with a --host name that the certificate lists.")
        return (f"the server's certificate is not trusted ({e.verify_message}). Use --cafile "
                "with the server's certificate, or --insecure to skip the check.")
    reason = getattr(e, "reason", None) or str(e)
    if "WRONG_VERSION_NUMBER" in str(reason).upper() or "wrong version" in str(e):
        return "the server does not speak TLS here (drop --tls?)."
    return f"{reason}."


# Windows device names: a file whose name is one of these, with any extension,
# opens the device instead ("con.txt" is the console).  Windows also reads
# COM¹-COM³ and LPT¹-LPT³ as devices; they are caught by comparing NFKC forms
# (¹ is 1), as are fullwidth spellings.
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", "conin$", "conout$",
                    *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def windows_device(name: str) -> bool:
    """True if Windows would open a device for a file called `name`: its part
    before the first dot, without trailing dots and spaces (Windows ignores
    them: "com1 .txt" is COM1), NFKC-normalised and case-folded, is reserved."""
    stem = name.split(".", 1)[0].rstrip(" .")
    return unicodedata.normalize("NFKC", stem).casefold() in WINDOWS_RESERVED


def safe_file_name(name: str) -> str:
    """A name that is safe to create in a download folder on any OS: the base
    name only (no folders, drive letters or ..), no control or invisible
    characters, none of Windows' forbidden characters or device names, at most
    MAX_FILE_NAME characters with the extension kept."""
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] not in "CZ" or c == " ")
    name = re.sub(r'[<>:"|?*]', "_", name).strip(" .")
    if windows_device(name):
        name = "_" + name
    if len(name) > MAX_FILE_NAME:
        stem, ext = os.path.splitext(name)
        ext = ext[:16]
        name = (stem[:MAX_FILE_NAME - len(ext)] + ext).rstrip(" .")  # Windows drops those
    return name or "file"


def counted(n: int, word: str, words: str | None = None) -> str:
    """'1 person', '1,204 people', '2 rooms'."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def format_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_size(text: str) -> int:
    """'5000', '10K', '2.5M', '1G' (powers of 1024) -> bytes; ValueError if not."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 500000, 10K, 20M, 1G)")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))



# ===========================================================================
# 3. Server core -- ServerConfig, Wire, Room, Session, Store, ChatServer.
#    Uses: constants, protocol.
#
# Each connection is an asyncio.Protocol (a Session) with its own line
# splitting and a Wire that says how its bytes are read and written (JSON
# lines natively; other wires plug in from below, so this section knows
# none of them).  Broadcast encodes an event once per wire kind and appends
# the same bytes to every member's output list; one callback per event-loop
# tick writes what each session is owed in a single transport.write().  A
# tick handles requests for at most TICK_SECONDS before it writes; joins and
# leaves wait a moment (Room.pending) to be written together.
# Nothing ever awaits a peer: a session whose unsent backlog passes the cap
# is dropped instead.
#
# The rule for everything a client can make the server hold (output
# backlog, history replies, rooms, room histories, resend memory, file
# streams, half-open TLS handshakes, log lines): it has a named per-client
# or global cap in ServerConfig, it is charged to the client that caused
# it, and it is released when that client goes.  No request skips the
# flood bucket (file chunks and acks are paced by their stream's window
# instead, and only once parsed and found to belong to one).
# ===========================================================================

def read_secret(path: str) -> str:
    """The first line of a password file (raises OSError or ValueError)."""
    text = Path(path).read_text(encoding="utf-8").splitlines()
    if not text or not text[0].strip():
        raise ValueError(f"{path} is empty")
    return text[0].strip()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every server option and limit, in one place.  The command line builds
    one with from_args(); tests and the benchmark build their own.  0 turns a
    count limit off where the flag's help says so."""

    history: int = HISTORY_LEN
    max_line_bytes: int = MAX_LINE_BYTES
    max_text: int = MAX_TEXT
    flood_burst: int = FLOOD_BURST
    flood_rate: float = FLOOD_RATE
    max_backlog_bytes: int = MAX_BACKLOG_BYTES
    history_grace: int = HISTORY_GRACE
    max_grace_total: int = MAX_GRACE_TOTAL
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    register_timeout: float = REGISTER_TIMEOUT
    motd: str | None = None
    rooms: tuple[str, ...] = ()
    password: str | None = None
    op_password: str | None = None
    ssl_context: Any = None
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    max_handshakes: int = MAX_HANDSHAKES
    data_dir: str | Path | None = None
    repair: bool = False
    fsync: str = "second"
    max_log_mb: float = MAX_LOG_MB
    room_keep: float = ROOM_KEEP
    max_history_mb: float = MAX_HISTORY_MB
    max_rooms: int = MAX_ROOMS
    max_rooms_per_user: int = MAX_ROOMS_PER_USER
    max_rooms_per_address: int = MAX_ROOMS_PER_ADDRESS
    max_clients: int = MAX_CLIENTS
    max_per_address: int = MAX_PER_ADDRESS
    connect_rate: float = CONNECT_RATE
    max_file_size: int = MAX_FILE_SIZE
    max_resend_entries: int = MAX_RESEND_ENTRIES
    auth_slow_after: int = AUTH_SLOW_AFTER
    auth_block_after: int = AUTH_BLOCK_AFTER
    server_name: str = "pychat"
    irc_port: int | None = None
    web: bool = True               # HTTP and WebSocket on the chat port (section 3c)
    web_port: int | None = None    # ...and on a port of their own
    web_origins: tuple[str, ...] = ()  # pages elsewhere (a reverse proxy) that may connect
    web_head_timeout: float = WEB_HEAD_TIMEOUT
    announce_port: int | None = None  # answer LAN discovery on this UDP port (None: don't)
    name: str = ""                 # what discovery calls this server (the command line: host name)
    tls_fingerprint: str | None = None  # SHA-256 of the certificate, hex, for discovery
    # The server link (section 3e): the hub to join, this server's name on
    # the network, the passwords each side sends, TLS for the uplink.
    link: tuple[str, int] | None = None
    link_name: str = ""
    link_password: str = ""
    link_peer_password: str = ""
    link_tls: Any = None
    max_remote_users: int = MAX_REMOTE_USERS
    max_remote_rooms: int = MAX_REMOTE_ROOMS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The server's options from its command line; PyChatError for anything wrong."""
        rooms = [r.strip() for r in args.rooms.split(",") if r.strip()]
        for room in rooms:
            problem = room_problem(room)
            if problem:
                raise PyChatError(f"bad room {room!r} in --rooms: {problem}")
        if args.history < 0:
            raise PyChatError("--history must be 0 or more")
        try:
            password = read_secret(args.password_file) if args.password_file else \
                os.environ.get("PYCHAT_PASSWORD") or None
            op_password = read_secret(args.op_password_file) if args.op_password_file else None
        except (OSError, ValueError) as e:
            raise PyChatError(f"cannot read a password file: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        ssl_context = fingerprint = None
        if args.certfile:
            try:
                ssl_context = server_tls_context(args.certfile, args.keyfile)
                fingerprint = certificate_fingerprint(args.certfile)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise PyChatError(f"cannot load the TLS certificate or key: {e}") from None
        elif args.keyfile:
            raise PyChatError("--keyfile needs --certfile")
        origins = tuple(o.strip().lower().rstrip("/") for o in args.web_origin)
        for origin in origins:
            if not re.fullmatch(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?", origin):
                raise PyChatError(f"bad --web-origin {origin!r}: give scheme://host[:port], "
                                  "such as https://chat.example.org")
        if args.no_web and (args.web_port is not None or origins):
            raise PyChatError("--no-web turns the web gateway off: no --web-port or --web-origin")
        link = link_options(args)
        return cls(history=args.history, max_line_bytes=args.max_line_bytes,
                   max_text=args.max_text, flood_burst=args.flood_burst,
                   flood_rate=args.flood_rate, max_backlog_bytes=args.max_backlog_bytes,
                   ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
                   motd=args.motd, rooms=tuple(rooms), password=password,
                   op_password=op_password, ssl_context=ssl_context,
                   data_dir=args.data_dir, repair=args.repair, fsync=args.fsync,
                   max_log_mb=args.max_log_mb, max_history_mb=args.max_history_mb,
                   max_rooms_per_address=args.max_rooms_per_address,
                   max_clients=args.max_clients, max_per_address=args.max_per_address,
                   connect_rate=args.connect_rate, max_handshakes=args.max_handshakes,
                   max_file_size=args.max_file_size, server_name=args.server_name,
                   irc_port=args.irc_port, web=not args.no_web, web_port=args.web_port,
                   web_origins=origins,
                   announce_port=None if args.no_announce else DISCOVERY_PORT,
                   name=clean_text(args.name or socket.gethostname() or "PyChat")[:64],
                   tls_fingerprint=fingerprint, max_remote_users=args.max_remote_users,
                   **link)


class Room:
    """A chat room: its members and a bounded ring buffer of recent messages."""

    def __init__(self, name: str, history: int, permanent: bool = False):
        self.name = name
        self.key = nick_key(name)             # one string shared by every member's s.rooms
        self.permanent = permanent            # the lobby and --rooms stay when empty
        self.members: dict[str, Session] = {}  # nick_key -> session
        self.history: collections.deque[dict] = collections.deque(maxlen=history)
        self.sizes: collections.deque[int] = collections.deque(maxlen=history)  # encoded bytes
        self.history_bytes = 0
        self.made_by = ""                     # the address key charged for making it
        self.ops: set[str] = set()            # nick keys of its operators (its maker first)
        self.wait_until = 0.0                 # loaded from disk: kept until then for members
        self.topic = ""
        self.topic_by = ""
        self.topic_ts = 0.0
        # Joins and leaves of this tick, not yet written: (event, its render
        # for the leaver's own wire kind, or None).  Written together, ahead of
        # any other event to the room (ChatServer.flush_presence).
        self.pending: list[tuple[dict, tuple[type, Any] | None]] = []
        # Members who came in while some were pending: the index in `pending`
        # from which the events are news to them (their user list had the rest).
        self.fresh: dict[Session, int] = {}
        self.presence_due = 0.0               # when the pending ones are written anyway
        # The member keys in order and each one's nick as JSON: a newcomer's
        # user list is then a join of bytes, not N nicks sorted and encoded
        # again for each of a join storm's N newcomers.
        self.order: list[str] = []
        self.listed: list[bytes] = []
        self.away_count = 0                   # members who are away (most often none)
        self.remote_count = 0                 # members on other servers (section 3e)
        self.bans: list[str] = []             # the network's ban masks (MODE +b), if linked

    def remember(self, event: dict, size: int) -> dict | None:
        """Add a message to the history; the one that fell out, if any."""
        if self.history.maxlen == 0:
            return event
        dropped = self.history[0] if len(self.history) == self.history.maxlen else None
        if dropped is not None:
            self.history_bytes -= self.sizes[0]
        self.history.append(event)
        self.sizes.append(size)
        self.history_bytes += size
        return dropped

    def forget_newest(self, dropped: dict | None) -> None:
        """Undo remember() (the message could not be saved)."""
        if not self.history.maxlen:
            return  # nothing was kept
        if self.history:
            self.history.pop()
            self.history_bytes -= self.sizes.pop()
        if dropped is not None:
            self.history.appendleft(dropped)
            size = len(encode(dropped))
            self.sizes.appendleft(size)
            self.history_bytes += size

    def forget_oldest(self) -> int:
        """Drop the oldest message; the bytes freed."""
        self.history.popleft()
        size = self.sizes.popleft()
        self.history_bytes -= size
        return size

    def add(self, key: str, s: Session) -> None:
        """A member comes in (or a new connection takes her place)."""
        if key not in self.members:
            at = bisect.bisect_left(self.order, key)
            self.order.insert(at, key)
            self.listed.insert(at, json.dumps(s.nick, ensure_ascii=False).encode("utf-8"))
            self.away_count += s.away is not None
            self.remote_count += s.remote
        self.members[key] = s

    def _unlist(self, key: str) -> None:
        at = bisect.bisect_left(self.order, key)
        if at < len(self.order) and self.order[at] == key:
            del self.order[at]
            del self.listed[at]

    def rename(self, old: str, new: str, s: Session) -> None:
        """A member's nick changed (keys `old` -> `new`)."""
        if self.members.pop(old, None) is not None:
            self._unlist(old)
            self.away_count -= s.away is not None
            self.remote_count -= s.remote
        self.add(new, s)

    def nicks(self) -> list[str]:
        members = self.members
        return [members[key].nick for key in self.order]  # type: ignore[misc]

    def away(self) -> dict[str, str]:
        """Away messages of the members who are away."""
        if not self.away_count:
            return {}
        return {s.nick: s.away for s in self.members.values() if s.away is not None}

    def _users_extras(self) -> dict:
        extras: dict[str, Any] = {}
        away = self.away()
        if away:
            extras["away"] = away
        if self.ops:
            extras["ops"] = sorted((s.nick for k, s in self.members.items() if k in self.ops),
                                   key=nick_key)
        if self.remote_count:  # who is on which other server of the network
            extras["via"] = {s.nick: s.via for s in self.members.values() if s.remote}
        return extras

    def users_event(self) -> dict:
        return {"type": "users", "room": self.name, "users": self.nicks(),
                **self._users_extras()}

    def users_line(self) -> bytes:
        """encode(users_event()), from the nicks kept encoded."""
        extras = encode(self._users_extras())[1:-2]  # '"away":{...},"ops":[...]'
        return b"".join((b'{"type":"users","room":',
                         json.dumps(self.name, ensure_ascii=False).encode("utf-8"),
                         b',"users":[', b",".join(self.listed), b"]",
                         b"," + extras if extras else b"", b"}\n"))

    def leave(self, key: str) -> None:
        """A member is gone from the room (and with her, her operator mark)."""
        gone = self.members.pop(key, None)
        self.ops.discard(key)
        if gone is not None:
            self._unlist(key)
            self.away_count -= gone.away is not None
            self.remote_count -= gone.remote
        if self.fresh and gone is not None:
            self.fresh.pop(gone, None)

    def topic_event(self) -> dict:
        return {"type": "topic", "room": self.name, "topic": self.topic, "by": self.topic_by,
                "ts": self.topic_ts}


def count_down(counts: dict[str, int], key: str) -> None:
    """One fewer of `key` (per-address counters): forgotten at zero, so the
    counter never holds addresses that are gone."""
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@functools.lru_cache(maxsize=1024)  # one string per address, however many connect from it
def canonical_address(address: str) -> str:
    """An IP address as one spelling: IPv4 also when it came IPv4-mapped
    (::ffff:1.2.3.4 on a dual-stack socket), IPv6 compressed, no zone."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # a Unix socket path, or nothing
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@functools.lru_cache(maxsize=1024)
def address_key(address: str) -> str:
    """What connection limits, bans and mutes count by: the IPv4 address, or
    the IPv6 address's /64 network (one IPv6 host usually owns a whole /64,
    so banning a single IPv6 address bans nobody)."""
    try:
        ip = ipaddress.ip_address(canonical_address(address))
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Wire:
    """How one connection's bytes become requests and events become bytes.
    This base is the core's own wire, JSON lines (protocol v1): the core
    encodes each event once and writes those bytes to every JSON member
    itself.  Other wires (IRC, section 3b) subclass it: the core hands them
    parsed lines and event dicts, asks them to render a broadcast once per
    wire kind, and never looks inside."""

    native = True       # JSON lines: the core writes them without asking
    joins_lobby = True  # registration puts the member in the lobby
    json_requests = True  # its requests are v1 JSON objects, parsed by the core
    byte_stream = False   # it frames its own input: data() gets the raw bytes
    linger = False        # a graceful close shuts our half first (see Session.close)
    # One per connection: slots here (subclasses may add a __dict__ of their own).
    __slots__ = ("server", "s")

    def __init__(self, server: ChatServer, session: Session):
        self.server, self.s = server, session

    @classmethod
    def claims(cls, server: ChatServer, line: bytes) -> bool:
        """Does this first line of a connection pick this wire?  (Asked of
        the wires in ChatServer.first_line_wires, in order.)"""
        return False

    def data(self, data: bytes) -> None:
        """Raw input bytes, for a byte_stream wire: it splits them itself and
        hands each complete JSON request to server.handle_line."""
        raise NotImplementedError

    def goodbye(self, reason: str) -> None:
        """The session is closing gracefully (`reason`: its leave reason):
        last bytes, if this wire has any to say, before the final flush."""

    def receive(self, line: bytes) -> None:
        """One input line, after the flood bucket took its token.  (JSON
        lines never come here: the core parses them itself, in handle_line.)"""
        raise NotImplementedError

    def tell(self, event: dict) -> None:
        self.s.send(encode(event))

    def render(self, event: dict) -> Any:
        """What a broadcast of `event` becomes for every member with this
        kind of wire, computed once per broadcast."""
        return encode(event)

    plain = False  # this member takes shared()'s bytes as they are (see broadcast)

    def shared(self, event: dict, rendered: Any) -> tuple[bytes | None, str | None]:
        """Bytes that every `plain` member of this wire kind gets for this
        broadcast, and the one nick that gets nothing; (None, None) when each
        member's take() decides.  Once per broadcast, so that the hot loop
        appends bytes without a call."""
        return None, None

    def take(self, event: dict, rendered: Any) -> None:
        """A broadcast for this member: `rendered` from render().  The core
        has already made sure the session will be flushed."""
        self.s.out.append(rendered)

    def take_presence(self, events: list[dict], rendered: list[Any], shared: dict) -> None:
        """A tick's joins and leaves in one room, in order, each as render()
        made it; `shared` is the same dict for every member of this wire kind
        that gets the same events (a place to keep what is built once).  (The
        core writes plain wires, whose take() is this class's, itself.)"""
        for event, got in zip(events, rendered):
            self.take(event, got)

    def joined(self, room: Room, after: int | None) -> None:
        """What a member needs on (re)joining a room."""
        self.server.send_room_state(self.s, room, after)

    def resume(self) -> None:
        """The peer has read what was written: its transport wants more."""


_NEVER_TYPED = -TYPING_RELAY_MIN  # one float for every new session, not one each


class Session(asyncio.Protocol):
    """One client connection: framing, flood bucket, output backlog."""

    # Slots: no per-connection __dict__, about 1 KiB less for each of many
    # thousands of connections.
    __slots__ = ("server", "transport", "address", "nick", "rooms", "inbuf", "out",
                 "closing", "leave_reason", "quit_message", "typing_at",
                 "grace_bytes", "away", "away_told", "operator", "auth_hold_until",
                 "connected_at", "last_rx", "pinged_at", "tokens", "token_time",
                 "flood_penalty", "token", "wire", "native", "spoke", "subnet",
                 "log_tokens", "log_time", "log_dropped", "history_unread", "tls_wait", "paused", "refusal", "authed",
                 "deferred", "deltas")

    remote = False  # a RemoteUser (section 3e): someone on another server of the network

    def __init__(self, server: ChatServer, wire: type[Wire] | None = None):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.nick: str | None = None
        self.rooms: dict[str, Room] = {}
        self.inbuf = b""                # a partial line; bytearray only while one grows
        self.out: list[bytes] = []
        self.closing = False
        self.leave_reason = "disconnected"
        self.quit_message = ""
        self.typing_at = _NEVER_TYPED
        self.grace_bytes = 0           # backlog allowed on top of the cap (history replies)
        self.away: str | None = None   # away message, None when here
        self.away_told: set[str] | None = None  # who already heard this user is away
        self.operator = False
        self.auth_hold_until = 0.0     # wrong password: next try not before this time
        now = server.loop.time()
        self.connected_at = now
        self.last_rx = now
        self.pinged_at: float | None = None
        self.tokens: float = server.cfg.flood_burst  # (a small int: no object of its own)
        self.token_time = now
        self.flood_penalty = 0.0
        self.token = ""                # secret for taking this nick over after a drop
        self.subnet = "?"              # the address key that limits, bans and mutes use
        self.log_tokens: float = LOG_BURST  # log lines this connection may still cause
        self.log_time = now
        self.log_dropped = 0
        self.history_unread: set[str] | None = None  # rooms whose history reply is unread
        self.tls_wait = False          # accepted, TLS handshake still going
        self.paused = False            # the transport's buffer is past its high-water mark
        self.refusal = ""              # refused; said once its first line shows its protocol
        self.authed = False            # gave the server password before its hello (auth)
        self.deferred = False          # complete lines wait in inbuf for the next tick
        self.deltas = False            # said "users_delta" in its hello's features
        # How this connection's bytes are read and written: JSON lines (the
        # core's own, written without a detour) unless a listener or the
        # first line says otherwise (see ChatServer.foreign_wire).
        self.spoke = wire is not None
        self.wire: Wire = (wire or Wire)(server, self)
        self.native = self.wire.native

    @property
    def peer(self) -> str:
        """Address and port, for the log ("?" until connected).  Worked out
        when asked: a string kept for each of 10,000 idle connections is
        600 KiB."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{self.address}:{peer[1]}" if isinstance(peer, tuple) else self.address

    @property
    def identity(self) -> str:
        """Who this is across reconnects: the first part of its resume token
        (see ChatServer.make_token); "" before it has one."""
        return self.token.partition(".")[0]

    # --- asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A TCP connection: counted and limited at once, before any TLS
        handshake (which would otherwise hold memory outside every limit)."""
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = canonical_address(str(peer[0]) if isinstance(peer, tuple) else str(peer))
        self.subnet = address_key(self.address)
        server = self.server
        refusal = server.admit(self)
        if server.cfg.ssl_context is not None:
            # A refused TLS connection is cut before its handshake (it cannot
            # be told why without one), and so is one past the handshake
            # caps: all at once, and per address (an eighth of them).
            busy = server.handshaking.get(self.subnet, 0)
            if refusal or server.handshakes >= server.cfg.max_handshakes or \
                    busy >= max(1, server.cfg.max_handshakes // 8):
                server.note_trouble("refused", f"{self.peer}: "
                                    f"{refusal or 'too many TLS handshakes at once'}")
                self.abort(refusal or "handshakes")
                return
            # start_tls (the task's first step, queued before any read of this
            # socket) stops reading and hands the bytes to the TLS layer.
            # Pausing here first would break that on Python 3.10.
            self.tls_wait = True
            server.handshakes += 1
            server.handshaking[self.subnet] = busy + 1
            server.loop.create_task(self._start_tls(transport))
            return
        if refusal and self.spoke:
            self.refuse(refusal)
        elif refusal:  # refused in the protocol of its first line (or JSON if none comes)
            self.refusal = refusal
            server.loop.call_later(REFUSE_WAIT, self.refuse, refusal)
        log.debug("connection from %s", self.peer)

    async def _start_tls(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        try:
            tls = await server.loop.start_tls(
                transport, self, server.cfg.ssl_context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=server.cfg.tls_handshake_timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:  # ssl.SSLError: OSError
            server.note_trouble("handshake", f"{self.peer}: TLS handshake failed: "
                                f"{e or type(e).__name__}")
            self.tls_wait = False
            self.abort("handshake")
            transport.abort()
            return
        finally:
            server.handshakes -= 1
            count_down(server.handshaking, self.subnet)
        self.tls_wait = False
        if tls is None or self.closing:  # the connection went meanwhile
            transport.abort()
            return
        self.transport = tls  # type: ignore[assignment]
        if self.out:
            self.flush()

    def refuse(self, code: str) -> None:
        if self.closing:
            return
        self.tell(error(code))
        self.close(code)
        self.server.note_trouble("refused", f"{self.peer}: {code}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.drop(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if not self.native:
            self.wire.resume()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.server.loop.time()
        self.pinged_at = None
        if not self.native and self.wire.byte_stream:  # it frames its input itself
            try:
                self.wire.data(data)
            except Exception:  # a server bug must end only this session
                log.exception("error handling input from %s", self.peer)
                self.close("error")
            return
        buf: bytes | bytearray = self.inbuf
        scan_from = len(buf)
        if buf:  # a line arriving in pieces grows in place (no quadratic copying)
            buf = buf if isinstance(buf, bytearray) else bytearray(buf)
            buf += data
        else:
            buf = data
        if self.deferred:  # (a transport that had data in hand when paused)
            self.inbuf = buf
            return
        self._lines(buf, scan_from)

    def _lines(self, buf: bytes | bytearray, scan_from: int = 0) -> None:
        """Handle the complete lines in `buf` until the tick has worked for
        TICK_SECONDS; the rest waits, with reading paused, for the next tick,
        after this one's output is written."""
        server = self.server
        limit = server.cfg.max_line_bytes
        start = 0
        while not self.closing:
            nl = buf.find(b"\n", max(start, scan_from))
            if nl < 0:
                break
            if nl - start > limit:
                break
            now = time.perf_counter()
            if server.tick_started is None:
                server.tick_started = now
            elif now - server.tick_started > TICK_SECONDS:
                self.inbuf = buf[start:] if start else buf
                self.defer()
                return
            line = bytes(buf[start:nl])
            start = nl + 1
            try:
                server.handle_line(self, line)
                if not self.native and self.wire.byte_stream and not self.closing:
                    # The first line picked a wire that frames its own input
                    # (HTTP): the rest of these bytes, and all later ones, are its.
                    self.inbuf = b""
                    if self.deferred:
                        self.deferred = False
                        self.transport.resume_reading()  # type: ignore[union-attr]
                    rest = bytes(buf[start:])
                    if rest:
                        self.wire.data(rest)
                    return
            except Exception:  # a server bug must end only this session
                log.exception("error handling a request from %s", self.peer)
                self.close("error")
        if self.closing:
            return
        rest = buf[start:] if start else buf
        self.inbuf = rest if rest else b""
        if self.deferred:  # all caught up: read again
            self.deferred = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        if len(rest) > limit:
            self.inbuf = b""
            self.tell(error("line_too_long", f"Lines are limited to {limit} bytes; closing."))
            self.close("line_too_long")

    def defer(self) -> None:
        """Stop reading until this tick's output is out, then go on with the
        lines already read (called_soon after the flush that schedule_flush
        has queued, so it runs after it)."""
        if not self.deferred:
            self.deferred = True
            if self.transport is not None:
                self.transport.pause_reading()
        self.server.schedule_flush()
        self.server.loop.call_soon(self.go_on)

    def go_on(self) -> None:
        if self.closing or not self.deferred:
            return
        buf, self.inbuf = self.inbuf, b""
        self._lines(buf)

    # --- output
    def tell(self, event: dict, data: bytes | None = None) -> None:
        """Send an event in this session's wire format; `data` is its JSON
        line when the caller has it already (one encoding for many)."""
        if self.native:
            self.send(data if data is not None else encode(event))
        else:
            self.wire.tell(event)

    def send(self, data: bytes) -> None:
        """Queue bytes for this session; they are written at the end of the tick."""
        if self.closing:
            return
        if not self.out:
            self.server.dirty.append(self)
            self.server.schedule_flush()
        self.out.append(data)

    def flush(self) -> None:
        """Write what this tick owes in one call; drop a peer that stopped reading."""
        if self.tls_wait:
            return  # written once the handshake is done
        out, self.out = self.out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])
            # The transport keeps what the kernel would not take.  Past the cap
            # this peer is not keeping up: cut it rather than buffer for it.
            backlog = transport.get_write_buffer_size()
            if backlog <= self.server.cfg.max_backlog_bytes:
                if self.grace_bytes:  # read: the history replies are no longer owed
                    self.server.grace_total -= self.grace_bytes
                    self.grace_bytes = 0
                if self.history_unread:
                    self.history_unread = None
            elif backlog > self.server.cfg.max_backlog_bytes + self.grace_bytes:
                self.abort("backlog")

    def owed(self) -> int:
        """Bytes this peer has not taken yet: the transport's and this tick's."""
        held = sum(map(len, self.out))
        if self.transport is not None:
            held += self.transport.get_write_buffer_size()
        return held

    def close(self, reason: str) -> None:
        """Flush what we owe, then close gracefully."""
        if self.closing:
            return
        self.leave_reason = reason
        if not self.native:
            self.wire.goodbye(reason)
        self.flush()
        self.closing = True
        self.server.drop(self)
        transport = self.transport
        if transport is None:
            return
        if self.wire.linger and transport.can_write_eof() and not transport.is_closing() \
                and not self.server.shutting_down:  # (never over TLS: it cannot write_eof)
            # Our half first: the peer reads our last bytes, then hangs up.  Closing
            # with its unread bytes here would reset the connection, which can
            # destroy those last bytes (an HTTP error, a WebSocket close frame)
            # before it reads them.  What it sends meanwhile is not read.
            transport.write_eof()
            self.server.loop.call_later(CLOSE_LINGER, transport.abort)
        else:
            transport.close()

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
        rate = self.server.cfg.flood_rate
        if rate <= 0:
            return True
        elapsed = now - self.token_time
        self.token_time = now
        self.tokens = min(self.server.cfg.flood_burst, self.tokens + elapsed * rate)
        self.flood_penalty = max(0.0, self.flood_penalty - elapsed * rate)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.flood_penalty += 1
        return False


def heap_trimmer() -> Callable[[], Any] | None:
    """glibc keeps the heap memory Python frees for later reuse, so a server
    that once held 10,000 connections would stay that big; malloc_trim(0)
    hands the free pages back.  None where there is no such call (macOS,
    Windows, musl): there is nothing to do."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, ImportError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class Transfer:
    """One offered file: who may accept it, and a stream per receiver who did:
    [receiver session, chunks not yet acknowledged, bytes relayed, chunks relayed]."""

    __slots__ = ("id", "sender", "offer", "eligible", "streams", "created")

    def __init__(self, tid: str, sender: Session, offer: dict, eligible: set[str],
                 created: float):
        self.id, self.sender, self.offer, self.created = tid, sender, offer, created
        self.eligible = eligible
        self.streams: dict[str, list] = {}


def _room_file(name: str) -> str:
    """A file name for a room's log: readable where it can be, unique always
    (room names may hold any visible character; file systems may not)."""
    key = nick_key(name)
    slug = "".join(c for c in key if c.isascii() and (c.isalnum() or c in "-_"))[:24]
    return f"{slug or 'room'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.jsonl"


class Store:
    """--data-dir: each room's messages and topic in an append-only JSON-lines
    log (written before anything is broadcast), plus state.json for what is
    not per room (bans, mutes, the message id counter, the token secret).

    A torn last line (a crash mid-write) is cut off with a warning; records
    that are not what the server writes are skipped with a warning; an
    unreadable room log is skipped.  An unreadable state.json stops the start
    (it holds the bans) unless --repair sets it aside.  A write that fails is
    cut back off the log, so a message refused with storage_failed never comes
    back after a restart.  At most MAX_OPEN_LOGS logs are open at a time.
    """

    def __init__(self, directory: Path, fsync: str = "second",
                 max_log_bytes: int = int(MAX_LOG_MB * 1024 * 1024), repair: bool = False):
        self.dir = directory
        self.rooms_dir = directory / "rooms"
        self.rooms_dir.mkdir(parents=True, exist_ok=True)  # OSError: the caller says so
        self.fsync = fsync
        self.max_log_bytes = max_log_bytes
        self.repair = repair
        self.files: dict[str, Any] = {}        # room key -> open raw append handle, LRU order
        self.sizes: dict[str, int] = {}        # room key -> bytes in its log
        self.compacted: dict[str, int] = {}    # room key -> size right after compaction
        self.unsynced: set[str] = set()        # room keys written since the last fsync

    # --- loading
    def load_rooms(self, history: int) -> list[tuple[str, list[dict], dict | None]]:
        """(name, last `history` messages, last topic event) for every room log."""
        rooms = []
        for path in sorted(self.rooms_dir.glob("*.jsonl")):
            try:
                records = self._read_log(path)
            except OSError as e:
                log.warning("cannot read %s (%s); that room starts empty", path, e.strerror)
                continue
            name, topic, bad = None, None, 0
            messages: collections.deque[dict] = collections.deque(maxlen=history)
            for rec in records:
                kind = self.record_kind(rec)
                if kind is None:
                    bad += 1
                    continue
                name = rec["room"]
                if kind == "msg":
                    messages.append(rec)
                else:
                    topic = rec
            if bad:
                log.warning("%s: %d records are not messages or topics PyChat wrote; "
                            "skipped", path, bad)
            if name is not None:
                rooms.append((name, list(messages), topic))
                self._rename_old_log(path, name)
        return rooms

    def _rename_old_log(self, path: Path, name: str) -> None:
        """A log named by an older version's spelling of the room (nick_key
        changed) takes today's name, so it is the one written and removed."""
        wanted = self.rooms_dir / _room_file(name)
        if path == wanted:
            return
        target = wanted if not wanted.exists() else path.with_name(path.name + ".old")
        try:
            os.replace(path, target)
        except OSError as e:
            log.warning("cannot rename %s to %s: %s", path, target.name, e)
            return
        if target != wanted:
            log.warning("%s is a second log of %s (an older spelling); loaded once and "
                        "kept as %s", path.name, name, target.name)

    @staticmethod
    def record_kind(rec: dict) -> str | None:
        """"msg" or "topic" for a record the server could have written, else None."""
        if not isinstance(rec.get("room"), str) or room_problem(rec["room"]):
            return None
        if rec.get("type") == "msg":
            ok = (isinstance(rec.get("id"), int) and not isinstance(rec["id"], bool)
                  and isinstance(rec.get("from"), str) and rec["from"]
                  and isinstance(rec.get("text"), str)
                  and isinstance(rec.get("ts"), (int, float)))
            return "msg" if ok else None
        if rec.get("type") == "topic" and isinstance(rec.get("topic"), str):
            return "topic"
        return None

    @staticmethod
    def _read_log(path: Path) -> list[dict]:
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1]:  # no newline at the end: the last write was torn
            log.warning("%s: the last line is incomplete (a crash while writing?); "
                        "skipped", path)
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
        records = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                records.append(rec)
            elif line.strip():
                log.warning("%s:%d: not a JSON object; skipped", path, number)
        return records

    def load_state(self) -> dict:
        """state.json's contents ({} if there is none).  One that cannot be
        read is never overwritten: PyChatError, or with --repair it is renamed
        state.json.bad-TIME and the server starts without it."""
        path = self.dir / "state.json"
        try:
            state = json.loads(path.read_text("utf-8"))
            if isinstance(state, dict):
                return state
            problem = "not a JSON object"
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            problem = str(getattr(e, "strerror", None) or e)
        if not self.repair:
            raise PyChatError(f"cannot read {path} ({problem}); it holds the bans, mutes and "
                              "message ids, so the server will not start over it. Fix it, or "
                              "start with --repair to set it aside and start without it.")
        kept = path.with_name(f"state.json.bad-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        log.warning("cannot read %s (%s); kept it as %s and started without it", path,
                    problem, kept.name)
        return {}

    # --- writing
    def save_state(self, state: dict) -> None:
        """Replace state.json atomically (bans and such change rarely)."""
        path = self.dir / "state.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False)
            f.flush()
            if self.fsync != "never":
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def _handle(self, room: Room) -> Any:
        """The room's log, open for appending without a buffer (so a failed
        write leaves nothing behind to be written later)."""
        key = nick_key(room.name)
        f = self.files.pop(key, None)
        if f is None:
            while len(self.files) >= MAX_OPEN_LOGS:
                self._close(next(iter(self.files)))
            f = open(self.rooms_dir / _room_file(room.name), "ab", buffering=0)
            self.sizes.setdefault(key, f.seek(0, os.SEEK_END))
        self.files[key] = f  # most recently used last
        return f

    def _close(self, key: str) -> None:
        f = self.files.pop(key)
        if key in self.unsynced and self.fsync != "never":
            self.unsynced.discard(key)
            try:
                os.fsync(f.fileno())
            except OSError as e:
                log.warning("fsync failed: %s", e)
        f.close()

    def append(self, room: Room, record: dict) -> None:
        """Write one record to a room's log before it is broadcast; raises
        OSError, with the log as it was before the call."""
        key = nick_key(room.name)
        f = self._handle(room)
        line = encode(record)
        good = self.sizes[key]
        try:
            written = 0
            while written < len(line):
                written += f.write(line[written:]) or 0
        except OSError:
            try:  # cut the partial record off: the message was refused
                f.truncate(good)
            except OSError as e:
                log.error("cannot cut a failed write off %s: %s", f.name, e)
            self._close(key)
            raise
        self.sizes[key] = good + len(line)  # in the OS now: a killed server loses nothing
        if self.fsync == "always":
            os.fsync(f.fileno())
        else:
            self.unsynced.add(key)
        if self.sizes[key] > max(self.max_log_bytes, 2 * self.compacted.get(key, 0)):
            try:  # the record is written: a failed compaction only postpones this
                self.compact(room)
            except OSError as e:
                log.error("cannot compact the log of %s: %s", room.name, e)

    def compact(self, room: Room) -> None:
        """Rewrite a room's log as just its topic and the history kept in memory."""
        key = nick_key(room.name)
        path = self.rooms_dir / _room_file(room.name)
        if key in self.files:
            self._close(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            if room.topic:
                out.write(encode(room.topic_event()))
            for message in room.history:
                out.write(encode(message))
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        os.replace(tmp, path)
        self.compacted[key] = self.sizes[key] = size
        log.info("compacted the log of %s to %d bytes", room.name, size)

    def remove(self, room: Room) -> None:
        """Delete a vanished room's log."""
        key = nick_key(room.name)
        if key in self.files:
            self._close(key)
        self.sizes.pop(key, None)
        self.compacted.pop(key, None)
        self.unsynced.discard(key)
        try:
            (self.rooms_dir / _room_file(room.name)).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the log of %s: %s", room.name, e)

    def sync(self) -> None:
        """fsync what was written since the last call (--fsync second)."""
        for key in list(self.unsynced):
            f = self.files.get(key)
            if f is not None:
                try:
                    os.fsync(f.fileno())
                except OSError as e:
                    log.warning("fsync failed: %s", e)
        self.unsynced.clear()

    def close(self) -> None:
        if self.fsync != "never":
            self.sync()
        for f in self.files.values():
            f.close()
        self.files.clear()


class ChatServer:
    """The rooms, the sessions, the request handlers and the housekeeping task."""

    # The wires a connection's first line can pick when it is not JSON: the
    # first of first_line_wires that claims() the line (HTTP, section 3c),
    # else foreign_wire (IRC, section 3b; also --irc-port's).  web_wire is
    # --web-port's.  Set by those sections, so this section names none of them.
    first_line_wires: list[type[Wire]] = []
    foreign_wire: type[Wire] | None = None
    web_wire: type[Wire] | None = None
    uplink: Any = None  # --link's server link (section 3e)

    def __init__(self, config: ServerConfig | None = None, **options: Any):
        """`options` override single fields of `config` (tests, the benchmark)."""
        cfg = self.cfg = dataclasses.replace(config or ServerConfig(), **options)
        self.per_address: dict[str, int] = {}   # address key -> open connections
        self.connect_buckets: dict[str, list[float]] = {}  # address key -> [tokens, time]
        self.handshakes = 0                     # TLS handshakes in progress...
        self.handshaking: dict[str, int] = {}   # ...and per address key
        self.grace_total = 0                    # history allowances given, all sessions
        # Resend memory, by identity (see Session.identity), never by nick:
        # identity -> {cid: (kind, id, room or recipient, ts)}, least recently
        # used first.  Ids, not texts: a resend is echoed with its own text.
        self.resend: dict[str, dict[Any, tuple]] = {}
        self.resend_seen: dict[str, float] = {}  # identity -> when it last sent
        self.resend_entries = 0                 # all identities together
        self.transfers: dict[str, Transfer] = {}
        self._transfer_ids = itertools.count(1)
        self.history_bytes = 0                  # every room's history together
        self.rooms_made: dict[str, int] = {}    # address key -> rooms it made that exist
        self.rooms: dict[str, Room] = {nick_key(LOBBY): Room(LOBBY, cfg.history, permanent=True)}
        for name in cfg.rooms:
            if nick_key(name) not in self.rooms:
                self.rooms[nick_key(name)] = Room(name, cfg.history, permanent=True)
        # Wrong passwords per address key: [count, last failure]; the server
        # password and the operator password each have their own record.
        self.auth_failures: dict[str, list[float]] = {}
        self.op_failures: dict[str, list[float]] = {}
        self.bans: dict[str, tuple[str, float]] = {}  # nick_key or "@address" -> (who, until)
        self.mutes: dict[str, str] = {}  # nick_key or "@address" -> the muted address
        self.nicks: dict[str, Session] = {}     # nick_key -> registered session
        # Every open connection (a dict, not a set: a third of the memory).
        self.sessions: dict[Session, None] = {}
        self.dirty: list[Session] = []          # sessions with output this tick
        self.presence_rooms: list[Room] = []    # rooms with joins or leaves to write
        self._flush_scheduled = False
        self.tick = 0                           # flushes so far (wires batch per tick)
        self.tick_started: float | None = None  # its first request (see TICK_SECONDS)
        self.shutting_down = False
        self.instance = secrets.token_hex(6)  # message ids are only comparable within one
        self.secret = secrets.token_bytes(32)   # signs resume tokens (kept in state.json)
        self._ids = itertools.count(1)
        self._id_floor = 0                      # ids below this are reserved on disk
        self._servers: list[asyncio.AbstractServer] = []
        self.datagram_transports: list[asyncio.BaseTransport] = []  # LAN discovery's
        self.discovery_rates: DiscoveryRates | None = None
        self.announce_ports: list[int] = []
        self.port = 0                           # the chat port, once listening
        self.link: Any = None                   # the uplink to an IRC network (section 3e)
        self._housekeeper: asyncio.Task | None = None
        self._trim = heap_trimmer()
        self._churn = 0                         # connects + disconnects since the last trim
        self._trouble: dict[str, tuple[float, int]] = {}  # see note_trouble
        self.trim_churn = TRIM_CHURN
        self.trim_delay = TRIM_DELAY
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.store = None if cfg.data_dir is None else \
            Store(Path(cfg.data_dir), cfg.fsync, int(cfg.max_log_mb * 1024 * 1024), cfg.repair)
        if self.store is not None:
            self._load()
        # One handler per request type of the protocol (FIELDS): handle_<type>.
        self.handlers: dict[str, Callable[[Session, dict], None]] = {
            kind: getattr(self, f"handle_{kind}") for kind in FIELDS}

    # --- lifecycle
    async def start(self, host: str | None = None, port: int = DEFAULT_PORT) -> int:
        """Listen on host:port (None: every interface); return the port bound."""
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(self._loop_trouble)
        # TLS is started by Session.connection_made, once the limits are applied.
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
        if self.cfg.irc_port is not None:  # IRC from the first line on
            self._servers.append(await self.loop.create_server(
                lambda: Session(self, self.foreign_wire), host, self.cfg.irc_port,
                reuse_address=True))
        if self.cfg.web_port is not None and self.cfg.web and self.web_wire is not None:
            self._servers.append(await self.loop.create_server(
                lambda: Session(self, self.web_wire), host, self.cfg.web_port,
                reuse_address=True))
        self._housekeeper = self.loop.create_task(self._housekeeping())
        if self.store is not None and self.store.fsync == "second":
            self.loop.call_later(FSYNC_EVERY, self._sync_tick)
        self.port = server.sockets[0].getsockname()[1]
        if self.cfg.announce_port is not None:
            self.announce_ports = await start_announcer(self, host)
        if self.cfg.link is not None:  # joins the network in the background, retrying
            self.link = self.uplink(self)
            self.link.start()
        self.trim_memory()  # what compiling this file left behind
        return self.port

    def announcement(self, qid: str) -> dict:
        """This server as LAN discovery describes it (section 3d)."""
        return {"pychat": "here", "v": 1, "id": qid, "name": self.cfg.name or SERVER_NAME,
                "port": self.port, "tls": self.cfg.ssl_context is not None,
                "fingerprint": self.cfg.tls_fingerprint, "password": bool(self.cfg.password),
                "users": self.local_users(), "version": __version__, "instance": self.instance}

    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def close(self, reason: str = "server shutting down") -> None:
        """Tell every client goodbye, close every connection, stop listening."""
        self.shutting_down = True
        if self.link is not None:
            self.link.close()
        for srv in self._servers:
            srv.close()
        for transport in self.datagram_transports:
            transport.close()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        bye_event = {"type": "bye", "reason": reason}
        bye = encode(bye_event)
        sessions = list(self.sessions)
        for s in sessions:
            s.tell(bye_event, bye)
            s.close("shutdown")
        self.flush_all()
        # Give the transports a moment to write the goodbye, then cut.
        deadline = self.loop.time() + 2.0
        while any(not s.transport.is_closing() or s.transport.get_write_buffer_size()
                  for s in sessions if s.transport is not None):
            if self.loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        for s in sessions:  # whoever still has not taken its goodbye is cut off
            if s.transport is not None and s.transport.get_write_buffer_size():
                s.transport.abort()
        for srv in self._servers:
            try:  # Python 3.12.1+ waits here for every connection to be gone
                await asyncio.wait_for(srv.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
        self._servers.clear()
        if self.store is not None:
            self.store.close()

    # --- persistence (--data-dir)
    def _load(self) -> None:
        """Rooms, history, topics, bans, mutes and the id counter from the store."""
        assert self.store is not None
        state = self.store.load_state()
        if isinstance(state.get("instance"), str) and state["instance"]:
            self.instance = state["instance"]  # ids continue: clients may compare them
        next_id = state.get("next_id") if isinstance(state.get("next_id"), int) else 1
        secret = state.get("secret")
        if isinstance(secret, str) and len(secret) == 64:
            self.secret = bytes.fromhex(secret)  # tokens from before a restart still resume
        permanent = set(self.rooms)
        for name, messages, topic in self.store.load_rooms(self.cfg.history):
            room = self.rooms.get(nick_key(name))
            if room is None:
                if len(self.rooms) >= self.cfg.max_rooms:
                    log.warning("more than %d rooms in the data directory; %s and "
                                "others are not loaded", self.cfg.max_rooms, name)
                    break
                room = self.rooms[nick_key(name)] = Room(name, self.cfg.history)
            if nick_key(name) not in permanent:  # made by joining: its members may come back
                room.wait_until = time.monotonic() + self.cfg.room_keep
            for m in messages:
                next_id = max(next_id, m["id"] + 1)
                identity = m.pop("sid", None)  # kept on disk only, for resends
                if isinstance(identity, str) and m.get("cid") is not None:
                    self._remember_cid(identity, m["cid"], ("msg", m["id"], room.name, m["ts"],
                                                            bool(m.get("action"))))
                self._add_history(room, m, len(encode(m)))
            if topic:
                room.topic = str(topic.get("topic") or "")
                room.topic_by = str(topic.get("by") or "")
                ts = topic.get("ts")
                room.topic_ts = float(ts) if isinstance(ts, (int, float)) else 0.0
        for entry in state.get("bans") or []:
            if isinstance(entry, list) and len(entry) == 3 and \
                    all(isinstance(x, str) for x in entry[:2]):
                until = entry[2] if isinstance(entry[2], (int, float)) else float("inf")
                self.bans[self._state_key(entry[0])] = (entry[1], until)
        if isinstance(state.get("mutes"), dict):
            self.mutes = {self._state_key(k): v for k, v in state["mutes"].items()
                          if isinstance(k, str) and isinstance(v, str)}
        self._ids = itertools.count(next_id)
        self._id_floor = next_id
        self.save_state()
        log.info("loaded %d rooms from %s; next message id %d", len(self.rooms),
                 self.store.dir, next_id)

    @staticmethod
    def _state_key(key: str) -> str:
        """A ban or mute key from state.json as this version spells it: nick
        keys through today's nick_key, addresses through address_key."""
        return "@" + address_key(key[1:]) if key.startswith("@") else nick_key(key)

    def save_state(self) -> None:
        if self.store is None:
            return
        bans = [[k, nick, None if until == float("inf") else until]
                for k, (nick, until) in self.bans.items()]
        try:
            self.store.save_state({"instance": self.instance, "next_id": self._id_floor,
                                   "secret": self.secret.hex(), "bans": bans,
                                   "mutes": self.mutes})
        except OSError as e:
            log.error("cannot save %s: %s", self.store.dir / "state.json", e)

    def next_id(self) -> int:
        """The next message id; with a store, ids are reserved on disk in blocks,
        so they keep growing across restarts and crashes."""
        i = next(self._ids)
        if self.store is not None and i >= self._id_floor:
            self._id_floor = i + ID_BLOCK
            self.save_state()
        return i

    def _persist(self, room: Room, record: dict) -> bool:
        """Log a record of a room before it is broadcast; False if it could not be."""
        if self.store is None:
            return True
        try:
            self.store.append(room, record)
        except OSError as e:
            self.note_trouble("storage", f"cannot write the log of {room.name}: {e}",
                              logging.ERROR)
            return False
        return True

    # --- history: every room's together is capped at --max-history-mb
    def _add_history(self, room: Room, event: dict, size: int) -> dict | None:
        """Keep a message in its room's history; the one that fell out, if any."""
        before = room.history_bytes
        dropped = room.remember(event, size)
        self.history_bytes += room.history_bytes - before
        budget = self.cfg.max_history_mb * 1024 * 1024
        while self.history_bytes > budget:
            # The oldest message anywhere goes first (ids grow with time).
            oldest = min((r for r in self.rooms.values() if r.history),
                         key=lambda r: r.history[0]["id"], default=None)
            if oldest is None:
                break
            self.history_bytes -= oldest.forget_oldest()
        return dropped

    def _sync_tick(self) -> None:
        if self.store is not None and not self.shutting_down:
            self.store.sync()
            self.loop.call_later(FSYNC_EVERY, self._sync_tick)

    # --- resends and identities.  A registration gets an identity; its resume
    # token is the identity signed with the server's secret, so the identity
    # (and with it the resend memory) survives a dropped link, and with
    # --data-dir a restart, but never passes to someone who merely takes the
    # same nick after her.
    def make_token(self, identity: str) -> str:
        nonce = secrets.token_hex(6)
        mac = hmac.new(self.secret, f"{identity}.{nonce}".encode(), "sha256").hexdigest()
        return f"{identity}.{nonce}.{mac[:32]}"

    def token_identity(self, token: Any) -> str | None:
        """The identity a token was made for, if this server (or, with
        --data-dir, an earlier run of it) made it."""
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 100:
            return None
        identity, nonce, mac = token.split(".")
        good = hmac.new(self.secret, f"{identity}.{nonce}".encode(), "sha256").hexdigest()[:32]
        return identity if hmac.compare_digest(good.encode(), mac.encode()) else None

    def _remember_cid(self, identity: str, cid: Any, entry: tuple) -> None:
        """Remember what a cid became: (kind, id, room or recipient, ts, action)."""
        cids = self.resend.pop(identity, None)
        if cids is None:
            cids = {}
        self.resend[identity] = cids  # most recently used last
        self.resend_seen[identity] = time.monotonic()
        if cid not in cids:
            self.resend_entries += 1
        cids[cid] = entry
        if len(cids) > CID_MEMORY:
            del cids[next(iter(cids))]
            self.resend_entries -= 1
        # Forget the least recently used identities: stale ones one per call,
        # any number while over the cap (ids only: about 200 bytes an entry).
        while self.resend:
            oldest = next(iter(self.resend))
            if self.resend_entries <= self.cfg.max_resend_entries and (
                    oldest == identity
                    or time.monotonic() - self.resend_seen[oldest] <= CID_FORGET):
                break
            self.resend_entries -= len(self.resend.pop(oldest))
            del self.resend_seen[oldest]
            if oldest == identity:
                break

    def _resent(self, s: Session, msg: dict, text: str) -> bool:
        """A message this sender sent before (its echo got lost): echo it again,
        rebuilt around the text sent again, to the sender only.  True if it was."""
        cid = msg.get("cid")
        cids = self.resend.get(s.identity)
        if cid is None or cids is None or cid not in cids:
            return False
        kind, mid, where, ts, action = cids[cid]
        echo: dict[str, Any] = {"type": kind}
        if kind == "msg":
            echo.update({"room": where, "from": s.nick})
        else:
            echo.update({"from": s.nick, "to": where})
        echo.update({"text": text, "ts": ts, "id": mid})
        if action:
            echo["action"] = True
        echo["cid"] = cid
        s.tell(echo)
        self.log(s, logging.INFO, "%s sent message %r again; echoed, not repeated",
                 s.nick, cid)
        return True

    # --- logging: the lines one client can make the server write are capped too
    def log(self, s: Session, level: int, fmt: str, *args: Any) -> None:
        """Log a line a client caused: LOG_BURST at once, then LOG_RATE a second
        per connection; how many were held back is said with the next one."""
        now = self.loop.time()
        s.log_tokens = min(LOG_BURST, s.log_tokens + (now - s.log_time) * LOG_RATE)
        s.log_time = now
        if s.log_tokens < 1:
            s.log_dropped += 1
            return
        s.log_tokens -= 1
        if s.log_dropped:
            log.log(level, "(%d lines about %s were not logged)", s.log_dropped, s.peer)
            s.log_dropped = 0
        log.log(level, fmt, *args)

    def note_trouble(self, kind: str, text: str, level: int = logging.INFO) -> None:
        """Log routine trouble from outside (refused connections, failed TLS
        handshakes, no file descriptors left) once per ACCEPT_ERROR_EVERY
        seconds per kind, with how many more there were."""
        now = time.monotonic()
        last, count = self._trouble.get(kind, (-math.inf, 0))
        if now - last < ACCEPT_ERROR_EVERY:
            self._trouble[kind] = (last, count + 1)
            return
        self._trouble[kind] = (now, 0)
        log.log(level, "%s%s", text,
                f" (and {count} more since the last such line)" if count else "")

    def _loop_trouble(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own reports: running out of file descriptors, or a peer
        that dropped a connection early, is one line now and then."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE,
                                                      errno.ENOBUFS, errno.ENOMEM):
            self.note_trouble("accept", f"cannot accept connections: {exc.strerror}; raise "
                              "the open-files limit (ulimit -n) or lower --max-clients")
        elif isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError)):
            self.note_trouble("early", "a connection failed before it started: "
                              f"{exc or context.get('message')}")
        else:
            loop.default_exception_handler(context)

    # --- output batching
    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        """Write what every session is owed: one write per session per tick."""
        if self.presence_rooms:
            rooms, self.presence_rooms, now = self.presence_rooms, [], self.loop.time()
            for room in rooms:
                if room.pending and room.presence_due - now > TICK_SECONDS:
                    self.presence_rooms.append(room)  # not yet
                elif room.pending:
                    self.flush_presence(room)
        self.tick += 1
        self.tick_started = None
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for s in dirty:
            s.flush()

    def broadcast(self, room: Room, event: dict, data: bytes | None = None) -> None:
        """Send one event (or its `data`, already encoded) to every member of a
        room, encoded once per wire kind.  This is the hot loop: Session.send
        inlined (measured: about 15 % of the server's time per delivery at
        1,000 members); JSON members get the same bytes without a call."""
        if room.pending:  # this tick's joins and leaves come first
            self.flush_presence(room)
        if data is None:
            data = encode(event)
        dirty = self.dirty
        rendered: dict[type, tuple[Any, bool]] = {}
        plain_kind: type | None = None  # the wire kind whose plain members get `shared`
        shared, skip = b"", None        # (see Wire.shared)
        for s in room.members.values():
            out = s.out
            if not out:
                if s.closing:
                    continue
                dirty.append(s)
            if s.native:
                out.append(data)
                continue
            wire = s.wire
            kind = type(wire)
            if kind is plain_kind and wire.plain:  # IRC, a room message: as cheap as JSON
                if s.nick != skip:
                    out.append(shared)
                continue
            got = rendered.get(kind)
            if got is None:  # its render, whether that goes out as it is, and (shared)
                got = rendered[kind] = ((r := wire.render(event)), kind.take is Wire.take,
                                        *wire.shared(event, r))
                if got[2] is not None and plain_kind is None:
                    plain_kind, shared, skip = kind, got[2], got[3]
            if got[1]:  # WebSocket frames: appended like JSON lines, without a call
                out.append(got[0])
            elif got[2] is not None and wire.plain:
                if s.nick != got[3]:
                    out.append(got[2])
            else:
                wire.take(event, got[0])
        if dirty:
            self.schedule_flush()

    # --- joins and leaves: coalesced per tick (issue 18)
    def presence(self, room: Room, event: dict, who: Session) -> None:
        """A join or leave of `who`: written with the room's other joins and
        leaves of the next moment (PRESENCE_SECONDS_PER_MEMBER), or before
        the next event to the room, so a storm of N joins costs each member
        a write now and then, not N."""
        if not room.pending:
            self.presence_rooms.append(room)
            delay = min(PRESENCE_MAX_DELAY, len(room.members) * PRESENCE_SECONDS_PER_MEMBER)
            room.presence_due = self.loop.time() + delay
            if delay < TICK_SECONDS:
                self.schedule_flush()
            else:
                self.loop.call_later(delay, self.schedule_flush)
        # A wire that names people by more than their nick (IRC's user name)
        # renders her own kind now, while the server still knows her.
        early = None if who.native else (type(who.wire), who.wire.render(event))
        room.pending.append((event, early))

    def flush_presence(self, room: Room) -> None:
        """Write a room's pending joins and leaves: to a JSON member that said
        "users_delta" one users_delta event, to other JSON members the v1
        join and leave lines, to other wires their own lines; each built once
        per wire kind (and per starting point, for members who came in during
        the tick and know the earlier ones from their user list)."""
        pending, room.pending = room.pending, []
        fresh, room.fresh = room.fresh, {}
        events = [e for e, _ in pending]
        built: dict[tuple[int, Any], Any] = {}
        dirty = self.dirty
        for s in room.members.values():
            start = fresh.get(s, 0) if fresh else 0
            if start >= len(events) or s.closing:
                continue
            if s.native:
                key = (start, s.deltas)
                data = built.get(key)
                if data is None:
                    data = built[key] = encode(users_delta(room.name, events[start:])) \
                        if s.deltas else b"".join(map(encode, events[start:]))
                if not s.out:
                    dirty.append(s)
                s.out.append(data)
                continue
            kind = type(s.wire)
            got = built.get((start, kind))
            if got is None:
                rendered = [early[1] if early is not None and early[0] is kind
                            else s.wire.render(e) for e, early in pending[start:]]
                plain = kind.take is Wire.take  # WebSocket frames: one buffer for all
                got = built[(start, kind)] = (rendered, b"".join(rendered) if plain else None, {})
            if not s.out:
                dirty.append(s)
            if got[1] is not None:
                s.out.append(got[1])
            else:
                s.wire.take_presence(events[start:], got[0], got[2])
        if dirty:
            self.schedule_flush()

    # --- connections
    def churn(self) -> None:
        """Count a connect or disconnect.  Once a burst of them has settled, hand
        the memory it freed back to the OS."""
        self._churn += 1
        if self._churn == self.trim_churn and self._trim is not None:
            self.loop.call_later(self.trim_delay, self._trim_when_settled, self._churn)

    def _trim_when_settled(self, seen: int) -> None:
        if self._churn != seen:  # still connecting or leaving: look again later
            self.loop.call_later(self.trim_delay, self._trim_when_settled, self._churn)
        else:
            self.trim_memory()

    def trim_memory(self) -> None:
        """Free what the burst left in reference cycles and free lists (gc.collect
        clears both), then hand the heap's free pages back.  Only when the server
        has the main thread: collecting in another thread would finalise objects
        that belong to that one (a Tk window's, in-process tests)."""
        self._churn = 0
        if self._trim is not None:
            started = time.perf_counter()
            if threading.current_thread() is threading.main_thread():
                gc.collect()
            self._trim()
            log.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1000)

    def admit(self, s: Session) -> str | None:
        """Count a new connection; the error code if it must be refused."""
        self.sessions[s] = None
        self.churn()
        address = s.subnet
        self.per_address[address] = self.per_address.get(address, 0) + 1
        if self.address_banned(address):
            return "banned"
        if self.cfg.max_clients and len(self.sessions) > self.cfg.max_clients:
            return "server_full"
        if self.cfg.max_per_address and self.per_address[address] > self.cfg.max_per_address:
            return "too_many_connections"
        if self.cfg.connect_rate > 0:
            now = self.loop.time()
            bucket = self.connect_buckets.get(address)
            if bucket is None:
                if len(self.connect_buckets) > 4096:  # forget addresses with a full bucket
                    full = CONNECT_BURST / self.cfg.connect_rate
                    self.connect_buckets = {a: b for a, b in self.connect_buckets.items()
                                            if now - b[1] < full}
                bucket = self.connect_buckets[address] = [float(CONNECT_BURST), now]
            if not spend(bucket, now, CONNECT_BURST, self.cfg.connect_rate):
                return "connecting_too_fast"
        return None

    def drop(self, s: Session) -> None:
        """Forget a session; tell its rooms it left (once)."""
        if s.grace_bytes:
            self.grace_total -= s.grace_bytes
            s.grace_bytes = 0
        if s in self.sessions:
            del self.sessions[s]
            self.churn()
            count_down(self.per_address, s.subnet)
            if self.transfers:
                self._drop_transfers(s)
        if s.nick is None:
            return
        key = nick_key(s.nick)
        log.info("%s (%s) left: %s", s.nick, s.peer, s.leave_reason)
        event = {"type": "leave", "room": "", "nick": s.nick, "reason": s.leave_reason,
                 "ts": round(time.time(), 3)}
        if s.quit_message:
            event["message"] = s.quit_message
        self.relay(s, event)
        for room in list(s.rooms.values()):
            room.leave(key)
            if not self.shutting_down:  # at shutdown everyone gets "bye" instead: no O(N^2)
                self.presence(room, dict(event, room=room.name), s)
            self._forget_if_empty(room)
        s.rooms.clear()
        if self.nicks.get(key) is s:  # only now: wires may look her up to render her leave
            del self.nicks[key]
        s.nick = None

    def _forget_if_empty(self, room: Room) -> None:
        """Rooms made on the fly vanish, history, topic and log included, when
        the last member leaves; the lobby and --rooms rooms stay.  (At shutdown
        nothing vanishes: after a restart, a room from --data-dir waits
        --room-keep seconds for its members to come back.)"""
        if room.members or room.permanent or self.shutting_down or \
                room.wait_until > time.monotonic():
            return
        if self.rooms.get(nick_key(room.name)) is not room:
            return
        del self.rooms[nick_key(room.name)]
        self.history_bytes -= room.history_bytes
        if room.made_by:
            count_down(self.rooms_made, room.made_by)
        if self.store is not None:
            self.store.remove(room)

    async def _housekeeping(self) -> None:
        """Close connections that never registered, ping silent clients and drop
        those that never answer (a ping interval or timeout of 0 turns pinging
        off), and let rooms loaded from disk go once nobody came back to them."""
        cfg = self.cfg
        pinging = cfg.ping_interval > 0 and cfg.ping_timeout > 0
        period = max(0.05, min(cfg.register_timeout, *((cfg.ping_interval, cfg.ping_timeout)
                                                       if pinging else ())) / 4)
        ping_event = {"type": "ping", "data": "keepalive"}
        ping = encode(ping_event)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            if self.link is not None:
                self.link.keepalive()
            for room in [r for r in self.rooms.values() if r.wait_until]:
                if room.wait_until <= time.monotonic():
                    room.wait_until = 0.0
                    self._forget_if_empty(room)
            for s in list(self.sessions):
                if s.nick is None and now - s.connected_at > self.cfg.register_timeout:
                    s.tell(error("not_registered", "No hello in time; closing."))
                    s.close("register_timeout")
                elif not pinging:
                    continue
                elif s.pinged_at is not None:
                    if now - s.pinged_at > self.cfg.ping_timeout:
                        s.abort("timeout")
                elif now - s.last_rx > self.cfg.ping_interval:
                    s.pinged_at = now
                    s.tell(ping_event, ping)

    # --- the network: what this server's users do, for the server link
    def relay(self, s: Session, event: dict) -> None:
        """An event a user of this server caused, for the rest of the IRC
        network (section 3e): called where the event happens, once."""
        if self.link is not None and not s.remote:
            self.link.relay(s, event)

    # --- requests
    def handle_line(self, s: Session, line: bytes) -> None:
        """Decode, validate and dispatch one request line."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():  # nothing to do, but not free either
            self._take_token(s)
            return
        # Every line costs a token, whatever it holds: garbage, pongs and
        # unregistered chatter are throttled exactly like messages.  The one
        # exception, file chunks and acks of a stream this session is part of
        # (the transfer window paces those), is decided on the parsed request,
        # never on the raw bytes: the prefix only says a parse must decide.
        json_in = s.native or s.wire.json_requests
        paced = json_in and s.spoke and line.startswith(b'{"type":"file_')
        if not paced and not self._take_token(s):
            return
        if not s.spoke:  # a first line that is not a JSON object picks another wire
            s.spoke = True
            if not line.lstrip().startswith(b"{"):
                wire = next((w for w in self.first_line_wires if w.claims(self, line)),
                            self.foreign_wire)
                if wire is not None:
                    s.wire = wire(self, s)
                    s.native = json_in = False
            if s.refusal:
                s.refuse(s.refusal)
                return
        if not json_in:
            s.wire.receive(line)
            return
        msg: dict | None = None
        try:
            msg = decode(line)
            kind = msg["type"]
            if paced and not self._in_stream(s, msg):
                paced = False
                if not self._take_token(s):
                    return
            if s.nick is None and kind not in ("hello", "auth", "ping", "pong"):
                raise ProtocolError("not_registered", ERRORS["not_registered"])
            validate(msg)
        except ProtocolError as e:
            if paced and not self._take_token(s):
                return
            self.log(s, logging.INFO, "%s (%s): %s", s.nick or "unregistered", s.peer, e.code)
            extra = self._error_context(msg) if msg is not None else {}
            s.tell(error(e.code, e.message, **extra))
            return
        handler = self.handlers[kind]  # looked up outside the try: a bug is not "unknown type"
        handler(s, msg)

    def _take_token(self, s: Session) -> bool:
        """Charge one request to the flood bucket; False (after telling the
        client, or closing a flooder) if it must be dropped."""
        if s.take_token(self.loop.time()):
            return True
        if s.flood_penalty > FLOOD_KICK:
            s.tell(error("flooding"))
            s.close("flood")
        else:
            s.tell(error("rate_limited"))
        return False

    def _in_stream(self, s: Session, msg: dict) -> bool:
        """A file chunk this session may send now (it is the sender of an
        accepted stream with room in its window), or an ack it owes (it
        receives a stream with chunks unacknowledged)."""
        tid = msg.get("id")
        t = self.transfers.get(tid) if isinstance(tid, str) else None
        if t is None:
            return False
        if msg["type"] == "file_chunk":
            to, data = msg.get("to"), msg.get("data")
            stream = t.streams.get(nick_key(to)) if isinstance(to, str) else None
            if t.sender is not s or stream is None or stream[1] >= FILE_WINDOW or \
                    not isinstance(data, str):
                return False
            # A big chunk moves the file on; a small one is free only as the
            # file's last (once): tiny or empty chunks are no flood-free channel.
            got, size = len(data) * 3 // 4, t.offer["size"]
            return got >= MIN_FREE_CHUNK or (stream[2] + got >= size
                                             and (stream[2] < size or not stream[3]))
        if msg["type"] == "file_ack" and s.nick is not None:
            stream = t.streams.get(nick_key(s.nick))
            return stream is not None and stream[0] is s and stream[1] > 0
        return False

    @staticmethod
    def _error_context(msg: dict) -> dict[str, Any]:
        """What an error reply copies from the failed request: its type and a
        well-formed cid (anything else in "cid" is not echoed)."""
        extra: dict[str, Any] = {"request": msg["type"][:40]}
        cid = msg.get("cid")
        if isinstance(cid, str):
            extra["cid"] = cid[:MAX_CID_LEN]
        elif isinstance(cid, int) and not isinstance(cid, bool) and abs(cid) <= MAX_CID_INT:
            extra["cid"] = cid
        return extra

    def _reply_error(self, s: Session, msg: dict, code: str, message: str | None = None) -> None:
        self.log(s, logging.INFO, "%s (%s): %s %s", s.nick or "unregistered", s.peer,
                 msg["type"][:40], code)
        s.tell(error(code, message, **self._error_context(msg)))

    def _check_nick(self, s: Session, msg: dict, nick: str) -> bool:
        problem = nick_problem(nick)
        if problem:
            self._reply_error(s, msg, "nick_invalid", problem)
            return False
        owner = self.nicks.get(nick_key(nick))
        if owner is not None and owner is not s:
            where = f" on {owner.via}" if owner.remote else ""
            self._reply_error(s, msg, "nick_taken", f"The nick {nick} is already in use{where}.")
            return False
        if self.link is not None and self.link.hides(nick):
            self._reply_error(s, msg, "nick_taken", f"The nick {nick} is in use on the network.")
            return False
        problem = self.link.nick_problem(nick) if self.link is not None else None
        if problem:
            self._reply_error(s, msg, "nick_invalid", problem)
            return False
        return True

    def handle_hello(self, s: Session, msg: dict) -> None:
        if s.nick is not None:
            self._reply_error(s, msg, "already_registered")
            return
        nick = msg["nick"]
        if self.address_banned(s.subnet):
            self._reply_error(s, msg, "banned")
            s.close("banned")
            return
        if self.cfg.password and not s.authed and \
                not self._check_password(s, msg, self.cfg.password, self.auth_failures):
            return
        if self.nick_banned(nick):
            self._reply_error(s, msg, "banned", f"The nick {nick} is banned here.")
            return
        # Ids the client has seen count only if they came from this server's
        # numbering (a restart without --data-dir starts again from 1).
        after = msg.get("after") if msg.get("instance") == self.instance else None
        after = {nick_key(str(k)): v for k, v in list((after or {}).items())[:self.cfg.max_rooms_per_user + 1]
                 if isinstance(v, int) and not isinstance(v, bool)}
        s.deltas = "users_delta" in (msg.get("features") or ())
        ghost = self.nicks.get(nick_key(nick))
        token = msg.get("token")
        if ghost is not None and token and ghost.token and \
                hmac.compare_digest(ghost.token.encode(), token.encode()):
            self._take_over(s, ghost)
            self._welcome(s, msg, ghost.identity, resumed=True)
            for room in list(s.rooms.values()):
                s.wire.joined(room, after.get(nick_key(room.name)))
            return
        if not self._check_nick(s, msg, nick):
            return
        s.nick = nick
        self.nicks[nick_key(nick)] = s
        self._welcome(s, msg, self.token_identity(token) or secrets.token_hex(8))
        self.relay(s, {"type": "intro"})
        lobby = self.rooms[nick_key(LOBBY)]
        if s.wire.joins_lobby and not self._room_banned(s, msg, lobby):  # (IRC users choose)
            self._join(s, lobby, after.get(nick_key(LOBBY)))

    def _welcome(self, s: Session, msg: dict, identity: str, resumed: bool = False) -> None:
        s.token = self.make_token(identity)
        welcome = {"type": "welcome", "nick": s.nick, "room": LOBBY, "server": SERVER_NAME,
                   "version": __version__, "instance": self.instance, "token": s.token,
                   "limits": {"max_text": self.cfg.max_text, "max_line_bytes": self.cfg.max_line_bytes,
                              "flood_burst": self.cfg.flood_burst, "flood_rate": self.cfg.flood_rate,
                              "ping_interval": self.cfg.ping_interval}}
        if resumed:
            welcome["resumed"] = True
            welcome["rooms"] = [r.name for r in s.rooms.values()]
        if self.cfg.motd:
            welcome["motd"] = self.cfg.motd
        s.tell(welcome)
        log.info("%s %s from %s (client %r)", s.nick, "came back" if resumed else "joined",
                 s.peer, str(msg.get("client", "?"))[:40])

    def _take_over(self, s: Session, ghost: Session) -> None:
        """A client back with its token after a dropped connection: the new
        connection takes the old one's place (nick, rooms, away, operator) and
        the old one is closed without anyone seeing a leave and a join."""
        assert ghost.nick is not None
        key = nick_key(ghost.nick)
        s.nick, s.rooms, s.away, s.away_told, s.operator = \
            ghost.nick, ghost.rooms, ghost.away, ghost.away_told, ghost.operator
        for room in s.rooms.values():
            room.members[key] = s
            if room.pending:  # its user list, sent next, has them all
                room.fresh[s] = len(room.pending)
        self.nicks[key] = s
        ghost.nick, ghost.rooms = None, {}
        ghost.abort("replaced")

    def _join(self, s: Session, room: Room, after: int | None = None) -> None:
        assert s.nick is not None
        join = {"type": "join", "room": room.name, "nick": s.nick, "ts": round(time.time(), 3)}
        if s.away is not None:
            join["away"] = s.away
        self.presence(room, join, s)
        room.add(nick_key(s.nick), s)
        room.fresh[s] = len(room.pending)  # her user list has who came before her
        s.rooms[room.key] = room
        s.wire.joined(room, after)
        self.relay(s, join)

    def send_room_state(self, s: Session, room: Room, after: int | None) -> None:
        """What a JSON member needs on (re)joining: history (after an id it
        already has, if it says), the user list and the topic."""
        self._send_history(s, room, after)
        if s.native:
            s.send(room.users_line())
        else:
            s.tell(room.users_event())
        if room.topic:
            s.tell(room.topic_event())

    def may_send_history(self, s: Session, room: Room, size: int) -> bool:
        """Charge a history reply of about `size` bytes before it is built;
        False (and the session dropped) if it owes too much already and has
        no allowance left.  Whoever sends the reply writes it at once, so
        many requests in one tick are checked one by one."""
        if not self._charge_history(s, room, size) and \
                s.owed() + size > self.cfg.max_backlog_bytes:
            s.abort("backlog")
            return False
        return True

    def _send_history(self, s: Session, room: Room, after: int | None) -> None:
        """A room's history, charged before it is built and written at once."""
        if not self.may_send_history(s, room, room.history_bytes + 64):
            return
        messages = list(room.history) if after is None else \
            [m for m in room.history if m["id"] > after]
        s.tell({"type": "history", "room": room.name, "messages": messages})
        s.flush()

    def _charge_history(self, s: Session, room: Room, size: int) -> bool:
        """A big history reply must not count as falling behind, but only up
        to history_grace bytes unread at once per client and max_grace_total
        for everyone: a client that asks again and again without reading is
        dropped like any slow reader.  True if the reply is allowed for."""
        if s.history_unread is None:
            s.history_unread = set()
        s.history_unread.add(room.key)
        if s.grace_bytes + size > self.cfg.history_grace or \
                self.grace_total + size > self.cfg.max_grace_total:
            return False
        s.grace_bytes += size
        self.grace_total += size
        return True

    def handle_history(self, s: Session, msg: dict) -> None:
        room = self._room_for(s, msg)
        if room is None:
            return
        if s.history_unread and room.key in s.history_unread:
            self._reply_error(s, msg, "history_pending", f"Your last history of {room.name} "
                              "has not reached you yet; ask again once it has.")
            return
        self._send_history(s, room, msg.get("after"))

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
        text = self._chat_text(s, msg)
        tags = self._tags(s, msg) if text is not None else False
        if tags is False:
            return
        room = self._room_for(s, msg)
        if room is None or self._resent(s, msg, text) or self._room_banned(s, msg, room):
            return
        cid = msg.get("cid")
        event = {"type": "msg", "room": room.name, "from": s.nick, "text": text,
                 "ts": round(time.time(), 3), "id": self.next_id()}
        if msg.get("action"):
            event["action"] = True
        if msg.get("notice"):  # a notice: no automatic replies to it (IRC's NOTICE)
            event["notice"] = True
        if tags:
            event["tags"] = tags
        if cid is not None:
            event["cid"] = cid
        # On disk the record also names the sender's identity, so a resend
        # after a restart is recognised (see _load).
        if not self.publish(room, event, dict(event, sid=s.identity) if cid is not None
                            else None):
            self._reply_error(s, msg, "storage_failed")
            return
        if cid is not None:
            self._remember_cid(s.identity, cid, ("msg", event["id"], room.name, event["ts"],
                                                 bool(msg.get("action"))))
        self.relay(s, event)

    def publish(self, room: Room, event: dict, record: dict | None = None) -> bool:
        """A message into a room: kept in its history, logged (`record`, if
        the log keeps more than the event), then sent to every member.
        False if it could not be saved: then it is not sent either."""
        data = encode(event)
        dropped = self._add_history(room, event, len(data))
        if not self._persist(room, record or event):
            before = room.history_bytes
            room.forget_newest(dropped)
            self.history_bytes += room.history_bytes - before
            return False
        self.broadcast(room, event, data)
        return True

    def handle_nick(self, s: Session, msg: dict) -> None:
        new = msg["nick"]
        old = s.nick
        assert old is not None
        if new == old or not self._check_nick(s, msg, new):
            return
        if self.is_muted(s):  # a new nick is seen by everyone: a message by other means
            self._reply_error(s, msg, "muted", "You are muted: you cannot change your nick.")
            return
        if self.nick_banned(new):
            self._reply_error(s, msg, "banned", f"The nick {new} is banned here.")
            return
        self.relay(s, self.rename(s, new))
        self.log(s, logging.INFO, "%s is now known as %s", old, new)

    def rename(self, s: Session, new: str) -> dict:
        """Someone's nick changes (checked already): everyone who shares a
        room with her hears it once, and so does she.  The event told."""
        old = str(s.nick)
        if self.nicks.get(nick_key(old)) is s:
            del self.nicks[nick_key(old)]
        self.nicks[nick_key(new)] = s
        s.nick = new
        for room in s.rooms.values():
            room.rename(nick_key(old), nick_key(new), s)
            if nick_key(old) in room.ops:
                room.ops.discard(nick_key(old))
                room.ops.add(nick_key(new))
        event = {"type": "nick", "old": old, "new": new, "ts": round(time.time(), 3)}
        if s.remote:
            event["via"] = s.via
        self._tell_sharers(s, event)
        return event

    def handle_users(self, s: Session, msg: dict) -> None:
        room = self._room_for(s, msg)
        if room is not None:
            s.tell(room.users_event())

    def handle_whois(self, s: Session, msg: dict) -> None:
        """Who someone is: her rooms, whether she is away, and her server."""
        target = self.nicks.get(nick_key(msg["nick"]))
        if target is None:
            self._no_such_nick(s, msg, msg["nick"])
            return
        event = {"type": "whois", "nick": target.nick,
                 "rooms": [r.name for r in target.rooms.values()],
                 "server": target.via if target.remote else self.name(),
                 "operator": target.operator}
        if target.away is not None:
            event["away"] = target.away
        if target.remote:
            event["via"] = target.via
        event["text"] = f"{target.nick} is on {event['server']}, " + \
            (f"in {', '.join(event['rooms'])}" if event["rooms"] else "in no room") + \
            (f"; away: {target.away or '(no message)'}" if target.away is not None else "") + \
            ("; a server operator" if target.operator else "")
        s.tell(event)

    def handle_stats(self, s: Session, msg: dict) -> None:
        """This server's counts, and its link to the network if it has one."""
        here = self.local_users()
        event = {"type": "stats", "server": self.name(), "users": here,
                 "connections": len(self.sessions), "rooms": len(self.rooms)}
        text = f"{self.name()}: {counted(here, 'person', 'people')} here on " \
               f"{counted(len(self.sessions), 'connection')}, {counted(len(self.rooms), 'room')}."
        if self.link is not None:
            event["link"] = self.link.status()
            text += " " + self.link.status_text()
        event["text"] = text
        s.tell(event)

    def local_users(self) -> int:
        """The people on this server (the nick table also has the network's)."""
        return len(self.nicks) - (len(self.link.users) if self.link is not None else 0)

    def name(self) -> str:
        """What this server is called: its name on the network, if linked."""
        return self.cfg.link_name or self.cfg.name or SERVER_NAME

    def handle_ping(self, s: Session, msg: dict) -> None:
        pong = {"type": "pong", "data": msg.get("data")}
        try:
            data = encode(pong)
        except (ValueError, RecursionError):  # absurdly nested data
            data = b""
        if not data or len(data) > MAX_PING_DATA + 30:
            self._reply_error(s, msg, "bad_request",
                              f"Ping data is echoed only up to {MAX_PING_DATA} bytes.")
            return
        s.tell(pong, data)

    def handle_pong(self, s: Session, msg: dict) -> None:
        pass  # any incoming line already counts as a sign of life

    def handle_typing(self, s: Session, msg: dict) -> None:
        """Relay "typing" to the room's other members: never stored, at most one per
        TYPING_RELAY_MIN seconds per client (extra ones are dropped silently)."""
        now = self.loop.time()
        if now - s.typing_at < TYPING_RELAY_MIN or self.is_muted(s):
            return
        room = self._room_for(s, msg)
        if room is None:
            return
        s.typing_at = now
        typing = {"type": "typing", "room": room.name, "nick": s.nick}
        data = encode(typing)
        for member in room.members.values():
            if member is not s:
                member.tell(typing, data)

    def handle_tagmsg(self, s: Session, msg: dict) -> None:
        """Tags without a message (IRC's TAGMSG: reactions and the like), to a
        room or one person; never stored."""
        tags = self._tags(s, msg)
        if tags is False or not tags or self.is_muted(s):
            return
        event: dict[str, Any] = {"type": "tagmsg", "from": s.nick, "tags": tags,
                                 "ts": round(time.time(), 3)}
        if msg.get("to") is not None:
            target = self.nicks.get(nick_key(msg["to"]))
            if target is None:
                self._reply_error(s, msg, "no_such_nick", f"Nobody is called {msg['to'][:40]}.")
                return
            event["to"] = target.nick
            target.tell(event)
            if target is not s:
                s.tell(event)
            return
        room = self._room_for(s, msg)
        if room is not None:
            self.broadcast(room, dict(event, room=room.name))

    def handle_quit(self, s: Session, msg: dict) -> None:
        reason = clean_text(msg.get("reason") or "").replace("\n", " ").strip()[:MAX_REASON_LEN]
        s.quit_message = "" if self.is_muted(s) else reason
        s.close("quit")


    # --- rooms
    def handle_join(self, s: Session, msg: dict) -> None:
        name = msg["room"]
        problem = room_problem(name) or (self.link.room_problem(name) if self.link is not None
                                         else None)
        if problem:
            self._reply_error(s, msg, "room_invalid", problem)
            return
        room = self.rooms.get(nick_key(name))
        if room is not None and nick_key(room.name) in s.rooms:
            s.tell(room.users_event())  # already there: just the current list
            return
        if len(s.rooms) >= self.cfg.max_rooms_per_user:
            self._reply_error(s, msg, "too_many_rooms",
                              f"You can be in at most {self.cfg.max_rooms_per_user} rooms.")
            return
        if room is not None and self._room_banned(s, msg, room):
            return
        if room is None:
            if len(self.rooms) >= self.cfg.max_rooms:
                self._reply_error(s, msg, "too_many_rooms", "This server has too many rooms.")
                return
            made = self.rooms_made.get(s.subnet, 0)
            if self.cfg.max_rooms_per_address and made >= self.cfg.max_rooms_per_address:
                self._reply_error(s, msg, "too_many_rooms", "Your address has made "
                                  f"{made} rooms that still exist; join one of those, or "
                                  "wait until one empties.")
                return
            room = self.rooms[nick_key(name)] = Room(name, self.cfg.history)
            room.made_by = s.subnet
            room.ops.add(nick_key(s.nick or ""))  # whoever makes a room runs it, as on IRC
            self.rooms_made[s.subnet] = made + 1
        self._join(s, room, msg.get("after"))

    def handle_part(self, s: Session, msg: dict) -> None:
        room = self._room_for(s, msg)
        if room is None:
            return
        assert s.nick is not None
        event = {"type": "leave", "room": room.name, "nick": s.nick, "reason": "part",
                 "ts": round(time.time(), 3)}
        reason = clean_text(msg.get("reason") or "").replace("\n", " ").strip()
        if reason and not self.is_muted(s):
            event["message"] = reason[:MAX_REASON_LEN]
        self.broadcast(room, event)  # she hears it too: that is her confirmation
        self.relay(s, event)
        room.leave(nick_key(s.nick))
        s.rooms.pop(nick_key(room.name), None)
        self._forget_if_empty(room)

    def handle_rooms(self, s: Session, msg: dict) -> None:
        rooms = [{"room": r.name, "users": len(r.members), "topic": r.topic}
                 for r in sorted(self.rooms.values(), key=lambda r: nick_key(r.name))]
        s.tell({"type": "rooms", "rooms": rooms})

    def handle_topic(self, s: Session, msg: dict) -> None:
        room = self._room_for(s, msg)
        if room is None:
            return
        if "topic" not in msg:  # a question, not a change
            s.tell(room.topic_event())
            return
        if self.is_muted(s):
            self._reply_error(s, msg, "muted")
            return
        topic = clean_text(msg["topic"]).replace("\n", " ").strip()
        if len(topic) > MAX_TOPIC:
            self._reply_error(s, msg, "too_long", f"Topics are limited to {MAX_TOPIC} characters.")
            return
        if self.link is not None and self.link.topiclen and \
                len(topic.encode("utf-8")) > self.link.topiclen:  # (else cut on the network)
            self._reply_error(s, msg, "too_long", "On a server linked to a network, topics are "
                              f"limited to {self.link.topiclen} bytes.")
            return
        before = room.topic, room.topic_by, room.topic_ts
        room.topic, room.topic_by, room.topic_ts = topic, s.nick or "", round(time.time(), 3)
        if not self._persist(room, room.topic_event()):
            room.topic, room.topic_by, room.topic_ts = before
            self._reply_error(s, msg, "storage_failed", "The server could not save the topic.")
            return
        self.broadcast(room, room.topic_event())
        self.relay(s, room.topic_event())

    # --- room operators: whoever makes a room runs it (and server operators
    # run every room); they can make others operators of it and kick from it.
    def _room_operator(self, s: Session, msg: dict) -> tuple[Room, Session] | None:
        """The room and the member a room-operator request is about, or None
        after saying why not."""
        room = self.rooms.get(nick_key(msg["room"]))
        if room is not None and not s.operator and nick_key(s.nick or "") not in room.ops:
            self._reply_error(s, msg, "not_operator", f"You are not an operator of {room.name}.")
            return None
        room = self._room_for(s, msg)
        if room is None:
            return None
        target = room.members.get(nick_key(msg["nick"]))
        if target is None:
            self._reply_error(s, msg, "no_such_nick", f"Nobody called {msg['nick'][:40]} is "
                              f"in {room.name}.")
            return None
        return room, target

    def handle_mode(self, s: Session, msg: dict) -> None:
        found = self._room_operator(s, msg)
        if found is None:
            return
        room, target = found
        key = nick_key(target.nick or "")
        if (key in room.ops) == msg["op"]:
            return  # nothing changes: nothing to announce
        (room.ops.add if msg["op"] else room.ops.discard)(key)
        event = {"type": "mode", "room": room.name, "nick": target.nick, "op": msg["op"],
                 "by": s.nick, "ts": round(time.time(), 3)}
        self.broadcast(room, event)
        self.relay(s, event)

    def _kick_from_room(self, s: Session, msg: dict) -> None:
        found = self._room_operator(s, msg)
        if found is None:
            return
        room, target = found
        self.relay(s, self.kick_out(room, target, str(s.nick), self._reason(msg)))

    def kick_out(self, room: Room, target: Session, by: str, reason: str,
                 via: str | None = None) -> dict:
        """Put someone out of a room (by a room operator here, or by one of
        the network's, `via` its server); the event everyone there saw."""
        event = {"type": "leave", "room": room.name, "nick": target.nick, "reason": "kick",
                 "by": by, "ts": round(time.time(), 3)}
        if reason:
            event["message"] = reason
        if via:
            event["via"] = via
        self.broadcast(room, event)  # the one kicked hears it too
        room.leave(nick_key(target.nick or ""))
        target.rooms.pop(nick_key(room.name), None)
        self._forget_if_empty(room)
        return event

    def _room_banned(self, s: Session, msg: dict, room: Room) -> bool:
        """The network's channel bans (MODE +b, section 3e) hold here too:
        True, after saying so, if `s` matches one of the room's."""
        if not room.bans or self.link is None or \
                not any(irc_match(mask, self.link.mask(s)) for mask in room.bans):
            return False
        self._reply_error(s, msg, "banned_from_room", f"The network's operators banned you "
                          f"from {room.name}.")
        return True

    # --- file transfer: offers go to a room or one person; each receiver who
    # accepts gets its own stream from the sender, relayed chunk by chunk with
    # a window of FILE_WINDOW unacknowledged chunks, so the server never holds
    # more than FILE_WINDOW chunks per stream (and never a whole file).
    def _sweep_transfers(self) -> None:
        now = self.loop.time()
        for tid, t in list(self.transfers.items()):
            if not t.streams and now - t.created > FILE_OFFER_TTL:
                del self.transfers[tid]

    def handle_file_offer(self, s: Session, msg: dict) -> None:
        if self.cfg.max_file_size <= 0:
            self._reply_error(s, msg, "transfers_disabled")
            return
        if self.is_muted(s):  # a file name is a message too
            self._reply_error(s, msg, "muted")
            return
        size, digest = msg["size"], msg["sha256"].lower()
        if not 0 <= size <= self.cfg.max_file_size:
            self._reply_error(s, msg, "file_too_big", f"Files are limited to "
                              f"{format_size(self.cfg.max_file_size)} here.")
            return
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            self._reply_error(s, msg, "bad_request", "sha256 is 64 hexadecimal digits.")
            return
        self._sweep_transfers()
        mine = [t for t in self.transfers.values() if t.sender is s]
        if sum(bool(t.streams) for t in mine) >= MAX_TRANSFERS or len(mine) >= MAX_OFFERS:
            self._reply_error(s, msg, "too_many_transfers", f"You can send {MAX_TRANSFERS} "
                              f"files at a time and have {MAX_OFFERS} offers open; wait, or "
                              "cancel one.")
            return
        offer = {"type": "file_offer", "id": f"f{next(self._transfer_ids)}", "from": s.nick,
                 "name": safe_file_name(msg["name"]), "size": size, "sha256": digest,
                 "ts": round(time.time(), 3)}
        if msg.get("to") is not None:
            target = self.nicks.get(nick_key(msg["to"]))
            if target is None or target is s:
                self._reply_error(s, msg, "no_such_nick", f"Nobody else is called "
                                  f"{msg['to'][:40]}.")
                return
            if target.remote:
                self._reply_error(s, msg, "remote_user", f"{target.nick} is on {target.via}: "
                                  "files do not cross the network, only messages.")
                return
            offer["to"] = target.nick
            audience = [target]
        else:
            room = self._room_for(s, msg)
            if room is None:
                return
            offer["room"] = room.name
            audience = [m for m in room.members.values() if m is not s and not m.remote]
        t = Transfer(offer["id"], s, offer, {nick_key(m.nick or "") for m in audience},
                     self.loop.time())
        self.transfers[t.id] = t
        data = encode(offer)
        for member in audience:
            member.tell(offer, data)
        echo = dict(offer, recipients=[m.nick for m in audience])
        if msg.get("cid") is not None:
            echo["cid"] = msg["cid"]
        s.tell(echo)
        self.log(s, logging.INFO, "%s offers a file of %d bytes (%s)", s.nick, size, t.id)

    def _transfer(self, s: Session, msg: dict) -> Transfer | None:
        t = self.transfers.get(msg["id"])
        if t is None:
            self._reply_error(s, msg, "no_such_transfer", "That file is no longer offered.")
        return t

    def handle_file_accept(self, s: Session, msg: dict) -> None:
        t = self._transfer(s, msg)
        if t is None:
            return
        key = nick_key(s.nick or "")
        if key not in t.eligible or key in t.streams:
            self._reply_error(s, msg, "no_such_transfer", "That file was not offered to you "
                              "(or you accepted it already).")
            return
        t.streams[key] = [s, 0, 0, 0]  # receiver, unacknowledged chunks, bytes, chunks
        t.sender.tell({"type": "file_accept", "id": t.id, "nick": s.nick})

    def handle_file_decline(self, s: Session, msg: dict) -> None:
        t = self._transfer(s, msg)
        if t is not None and nick_key(s.nick or "") in t.eligible:
            t.eligible.discard(nick_key(s.nick or ""))
            t.sender.tell({"type": "file_decline", "id": t.id, "nick": s.nick})

    def _stream(self, s: Session, msg: dict) -> tuple[Transfer, list] | None:
        """The sender's stream to msg["to"], or None after saying why not."""
        t = self._transfer(s, msg)
        if t is None:
            return None
        stream = t.streams.get(nick_key(msg["to"])) if t.sender is s else None
        if stream is None:
            self._reply_error(s, msg, "no_such_transfer",
                              f"{msg['to'][:40]} has not accepted that file.")
            return None
        return t, stream

    def handle_file_chunk(self, s: Session, msg: dict) -> None:
        found = self._stream(s, msg)
        if found is None:
            return
        t, stream = found
        receiver = stream[0]
        stream[1] += 1
        stream[3] += 1
        data, size = msg["data"], t.offer["size"]
        stream[2] += len(data) * 3 // 4 - (2 if data.endswith("==") else data.endswith("="))
        if stream[1] > FILE_WINDOW or stream[2] > size + 3:
            self._reply_error(s, msg, "file_window", "Chunks must wait for acknowledgements "
                              f"(at most {FILE_WINDOW} ahead) and add up to the offered size.")
            self._end_stream(t, nick_key(receiver.nick or ""), "the sender broke the rules")
            return
        receiver.tell({"type": "file_chunk", "id": t.id, "seq": msg["seq"],
                              "data": data})

    def handle_file_ack(self, s: Session, msg: dict) -> None:
        t = self._transfer(s, msg)
        stream = t.streams.get(nick_key(s.nick or "")) if t is not None else None
        if t is not None and stream is not None and stream[0] is s and stream[1] > 0:
            stream[1] -= 1  # (an ack for no chunk is not passed on)
            t.sender.tell({"type": "file_ack", "id": t.id, "nick": s.nick,
                                  "seq": msg["seq"]})

    def handle_file_done(self, s: Session, msg: dict) -> None:
        found = self._stream(s, msg)
        if found is not None:
            found[1][0].tell({"type": "file_done", "id": found[0].id})

    def handle_file_received(self, s: Session, msg: dict) -> None:
        t = self._transfer(s, msg)
        key = nick_key(s.nick or "")
        if t is None or key not in t.streams:
            return
        del t.streams[key]
        t.eligible.discard(key)
        result = {"type": "file_result", "id": t.id, "nick": s.nick, "ok": msg["ok"]}
        if msg.get("reason") and not self.is_muted(s):
            result["reason"] = clean_text(msg["reason"])[:MAX_REASON_LEN]
        t.sender.tell(result)
        if not t.eligible and "to" in t.offer:
            self.transfers.pop(t.id, None)

    def handle_file_cancel(self, s: Session, msg: dict) -> None:
        t = self._transfer(s, msg)
        if t is None:
            return
        reason = "cancelled" if self.is_muted(s) else \
            clean_text(msg.get("reason") or "cancelled")[:MAX_REASON_LEN]
        if t.sender is s:
            parties = t.eligible | set(t.streams)  # a reason reaches no one else
            targets = [nick_key(msg["to"])] if msg.get("to") else list(parties)
            for key in targets:
                if key in parties:
                    self._end_stream(t, key, reason)
            if not msg.get("to"):
                self.transfers.pop(t.id, None)
        else:
            key = nick_key(s.nick or "")
            involved = t.streams.pop(key, None) is not None or key in t.eligible
            t.eligible.discard(key)
            if involved:
                t.sender.tell({"type": "file_cancel", "id": t.id, "nick": s.nick,
                                      "reason": reason})

    def _end_stream(self, t: Transfer, key: str, reason: str) -> None:
        """Tell a receiver (offered or streaming) that the sender's side is over;
        nobody who was not offered the file hears of it."""
        stream = t.streams.pop(key, None)
        offered = key in t.eligible
        t.eligible.discard(key)
        receiver = stream[0] if stream else self.nicks.get(key) if offered else None
        if receiver is not None:
            receiver.tell({"type": "file_cancel", "id": t.id, "nick": t.sender.nick,
                                  "reason": reason})

    def _drop_transfers(self, s: Session) -> None:
        """A sender or receiver is gone: end what it was part of."""
        why = "the server is shutting down" if self.shutting_down else f"{s.nick} left"
        for t in list(self.transfers.values()):
            if t.sender is s:
                for key in list(t.eligible | set(t.streams)):
                    self._end_stream(t, key, why)
                del self.transfers[t.id]
            else:
                key = nick_key(s.nick or "")
                stream = t.streams.get(key)
                if (stream is not None and stream[0] is s) or (stream is None and
                                                                key in t.eligible):
                    t.streams.pop(key, None)
                    t.eligible.discard(key)
                    t.sender.tell({"type": "file_cancel", "id": t.id, "nick": s.nick,
                                   "reason": why})

    # --- private messages and away
    def _tags(self, s: Session, msg: dict) -> dict | None | bool:
        """A request's client tags (opaque names and values relayed to the
        clients that want them, e.g. IRC's +draft/react), {} for none, or
        False after saying they are not acceptable."""
        tags = msg.get("tags") or {}
        if tags and (not all(isinstance(k, str) and isinstance(v, str) and _TAG_NAME.fullmatch(k)
                             for k, v in tags.items())
                     or len(encode(tags)) > MAX_TAG_BYTES):
            self._reply_error(s, msg, "bad_tags")
            return False
        return {k: _CONTROL_RE.sub("", v) for k, v in tags.items()}

    def _chat_text(self, s: Session, msg: dict) -> str | None:
        """The cleaned text of a msg or pm, or None after replying with the problem."""
        text = clean_text(msg["text"])
        cid = msg.get("cid")
        if not text.strip():
            self._reply_error(s, msg, "empty", "Empty messages are not sent.")
        elif len(text) > self.cfg.max_text:
            self._reply_error(s, msg, "too_long",
                              f"Messages are limited to {self.cfg.max_text} characters.")
        elif (isinstance(cid, str) and len(cid) > MAX_CID_LEN) or (
                isinstance(cid, int) and abs(cid) > MAX_CID_INT):
            self._reply_error(s, msg, "bad_request",
                              f"cid is a string of at most {MAX_CID_LEN} characters or an "
                              "integer of at most 2**53.")
        elif self.is_muted(s):
            self._reply_error(s, msg, "muted")
        else:
            return text
        return None

    def handle_pm(self, s: Session, msg: dict) -> None:
        """A private message: to the recipient and back to the sender, never stored
        and never logged."""
        text = self._chat_text(s, msg)
        tags = self._tags(s, msg) if text is not None else False
        if tags is False or self._resent(s, msg, text or ""):
            return
        target = self.nicks.get(nick_key(msg["to"]))
        if target is None:
            self._no_such_nick(s, msg, msg["to"])
            return
        event = {"type": "pm", "from": s.nick, "to": target.nick, "text": text,
                 "ts": round(time.time(), 3), "id": self.next_id()}
        for flag in ("action", "notice", "ctcp"):  # ctcp: a client-to-client query's body
            if msg.get(flag) and (flag != "ctcp" or not s.wire.json_requests):  # IRC's only
                event[flag] = True
        if tags:
            event["tags"] = tags
        if target is not s:
            target.tell(event)
        if msg.get("cid") is not None:
            event["cid"] = msg["cid"]
            self._remember_cid(s.identity, msg["cid"], ("pm", event["id"], target.nick,
                                                        event["ts"], bool(msg.get("action"))))
        s.tell(event)
        assert s.nick is not None
        if target.away is not None and nick_key(s.nick) not in (target.away_told or ()):
            if target.away_told is None:
                target.away_told = set()
            target.away_told.add(nick_key(s.nick))  # once per conversation
            s.tell({"type": "notice", "nick": target.nick, "away": target.away,
                           "text": f"{target.nick} is away: {target.away or '(no message)'}"})

    def _no_such_nick(self, s: Session, msg: dict, nick: str) -> None:
        """Nobody here is called `nick`: or she is, on a server cut off just
        now (a netsplit), and whatever was meant for her is not sent."""
        via = self.link.split_from(nick) if self.link is not None else None
        if via:
            self._reply_error(s, msg, "unreachable", f"{nick[:40]} is on {via}, which a "
                              "netsplit has cut off from this server just now")
        else:
            self._reply_error(s, msg, "no_such_nick", f"Nobody is called {nick[:40]}.")

    def _tell_sharers(self, s: Session, event: dict, also: Session | None = None) -> None:
        """Send an event about `s` once to everyone sharing a room with her, to her,
        and to `also`."""
        audience = {s} if also is None else {s, also}
        for room in s.rooms.values():
            if room.pending:  # this tick's joins and leaves come first
                self.flush_presence(room)
            audience.update(room.members.values())
        data = encode(event)
        for member in audience:
            member.tell(event, data)

    def handle_away(self, s: Session, msg: dict) -> None:
        message = clean_text(msg.get("message") or "").replace("\n", " ").strip()
        if self.is_muted(s):
            message = ""  # away, yes; a message to everyone, no
        if s.away is None:
            for room in s.rooms.values():
                room.away_count += 1
        s.away = message[:MAX_AWAY]
        s.away_told = None
        event = {"type": "away", "nick": s.nick, "away": True, "message": s.away}
        self._tell_sharers(s, event)
        self.relay(s, event)

    def handle_back(self, s: Session, msg: dict) -> None:
        if s.away is None:
            return
        for room in s.rooms.values():
            room.away_count -= 1
        s.away = None
        s.away_told = None
        event = {"type": "away", "nick": s.nick, "away": False}
        self._tell_sharers(s, event)
        self.relay(s, event)

    # --- authentication and moderation
    def _check_password(self, s: Session, msg: dict, expected: str,
                        failures: dict[str, list[float]]) -> bool:
        """Constant-time check, with wrong guesses slowed down and then refused per
        address, so a password cannot be guessed at line speed.  `failures` is
        that password's own record: a right server password does not forgive
        wrong operator passwords."""
        now = self.loop.time()
        key = s.subnet
        record = failures.get(key)
        if record is not None and now - record[1] > AUTH_FORGET:
            del failures[key]
            record = None
        if record is not None and record[0] >= self.cfg.auth_block_after and \
                now - record[1] < AUTH_BLOCK_SECONDS:
            self._reply_error(s, msg, "auth_blocked")
            if s.nick is None:
                s.close("auth_blocked")
            return False
        if now < s.auth_hold_until:
            self._reply_error(s, msg, "rate_limited", "Wait for the answer to your last try.")
            return False
        given = msg.get("password")
        if not given:  # no guess at all: just say a password is needed
            self._reply_error(s, msg, "auth_failed", "This server needs a password.")
            return False
        if isinstance(given, str) and hmac.compare_digest(given.encode("utf-8"),
                                                          expected.encode("utf-8")):
            failures.pop(key, None)  # a right answer forgives the typos
            return True
        if len(failures) > 10000:  # bounded: forget the oldest half
            for address in sorted(failures, key=lambda a: failures[a][1])[:5000]:
                del failures[address]
        record = failures.setdefault(key, [0, now])
        record[0] += 1
        record[1] = now
        self.log(s, logging.WARNING, "wrong %spassword from %s (%d)",
                 "operator " if failures is self.op_failures else "", s.peer, int(record[0]))
        delay = 0.0
        if record[0] >= self.cfg.auth_slow_after:
            delay = min(AUTH_MAX_DELAY, 0.5 * 2 ** (record[0] - self.cfg.auth_slow_after))
        reply = error("auth_failed", "Wrong password.", **self._error_context(msg))
        s.auth_hold_until = now + delay
        if delay:
            self.loop.call_later(delay, s.tell, reply)
        else:
            s.tell(reply)
        return False

    def handle_auth(self, s: Session, msg: dict) -> None:
        """The server password before hello (IRC's SASL PLAIN): checked like
        the one in hello, with the same record of wrong guesses."""
        if s.nick is not None:
            self._reply_error(s, msg, "already_registered")
        elif not self.cfg.password:
            s.authed = True
            s.tell({"type": "auth", "ok": True})
        elif self._check_password(s, msg, self.cfg.password, self.auth_failures):
            s.authed = True
            s.tell({"type": "auth", "ok": True})

    def handle_op(self, s: Session, msg: dict) -> None:
        if not self.cfg.op_password:
            self._reply_error(s, msg, "not_operator", "This server has no operators.")
            return
        if self._check_password(s, msg, self.cfg.op_password, self.op_failures):
            s.operator = True
            log.info("%s (%s) is now an operator", s.nick, s.peer)
            s.tell({"type": "op", "nick": s.nick, "ok": True})

    def _moderate(self, s: Session, msg: dict) -> Session | None:
        """The target of a moderation request, or None after replying why not."""
        if not s.operator:
            self._reply_error(s, msg, "not_operator")
            return None
        target = self.nicks.get(nick_key(msg["nick"]))
        if target is None:
            self._no_such_nick(s, msg, msg["nick"])
        elif target.remote:
            self._reply_error(s, msg, "remote_user", f"{target.nick} is on {target.via}: "
                              "operators here can kick them from a room (/kick in the room); "
                              "kicks from the chat, bans and mutes reach this server's users.")
            return None
        return target

    def _announce(self, s: Session, target: Session, action: str, reason: str) -> None:
        """Moderation is public: the target's rooms and the operator see it."""
        event = {"type": "moderation", "action": action, "nick": target.nick, "by": s.nick,
                 "reason": reason, "ts": round(time.time(), 3)}
        self._tell_sharers(target, event, also=s)
        log.info("%s: %s %s (%s)", s.nick, action, target.nick, reason)

    def _reason(self, msg: dict) -> str:
        return clean_text(msg.get("reason") or "").replace("\n", " ").strip()[:MAX_REASON_LEN]

    def _remove(self, target: Session, code: str, text: str) -> None:
        target.tell({"type": "bye", "code": code, "reason": text})
        target.quit_message = text
        target.close(code)

    def handle_kick(self, s: Session, msg: dict) -> None:
        if msg.get("room"):
            self._kick_from_room(s, msg)
            return
        target = self._moderate(s, msg)
        if target is not None:
            reason = self._reason(msg)
            self._announce(s, target, "kick", reason)
            self._remove(target, "kicked", f"kicked by {s.nick}" + (f": {reason}" if reason
                                                                     else ""))

    def handle_ban(self, s: Session, msg: dict) -> None:
        target = self._moderate(s, msg)
        if target is None:
            return
        minutes = msg.get("minutes")
        if minutes is not None and not 0 < minutes <= 10 ** 7:
            self._reply_error(s, msg, "bad_request", "minutes is a positive number.")
            return
        until = time.time() + float(minutes) * 60 if minutes else float("inf")
        assert target.nick is not None
        self.bans[nick_key(target.nick)] = (target.nick, until)
        self.bans["@" + target.subnet] = (target.nick, until)
        self.save_state()
        reason = self._reason(msg)
        self._announce(s, target, "ban", reason)
        text = f"banned by {s.nick}" + (f": {reason}" if reason else "")
        for other in list(self.sessions):  # every connection from there, registered or not
            if other.subnet == target.subnet and other is not s and other is not target:
                self._remove(other, "banned", text)
        self._remove(target, "banned", text)

    def handle_unban(self, s: Session, msg: dict) -> None:
        if not s.operator:
            self._reply_error(s, msg, "not_operator")
            return
        key = nick_key(msg["nick"])
        entry = self.bans.pop(key, None)
        if entry is None:
            self._reply_error(s, msg, "no_such_nick", f"{msg['nick'][:40]} is not banned.")
            return
        for k, (nick, _) in list(self.bans.items()):  # and the addresses banned with it
            if k.startswith("@") and nick_key(nick) == key:
                del self.bans[k]
        self.save_state()
        s.tell({"type": "moderation", "action": "unban", "nick": entry[0],
                       "by": s.nick, "reason": "", "ts": round(time.time(), 3)})

    def handle_mute(self, s: Session, msg: dict) -> None:
        target = self._moderate(s, msg)
        if target is not None:
            assert target.nick is not None
            # By nick and address, so reconnecting or renaming does not unmute.
            self.mutes.update({nick_key(target.nick): target.subnet,
                               "@" + target.subnet: target.subnet})
            self.save_state()
            self._announce(s, target, "mute", self._reason(msg))

    def handle_unmute(self, s: Session, msg: dict) -> None:
        target = self._moderate(s, msg)
        if target is not None:
            assert target.nick is not None
            gone = {nick_key(target.nick)} | {k for k, a in self.mutes.items()
                                              if a == target.subnet}
            for key in gone:  # the nick and everything muted from that address
                self.mutes.pop(key, None)
            self.save_state()
            self._announce(s, target, "unmute", "")

    def is_muted(self, s: Session) -> bool:
        return bool(self.mutes) and (nick_key(s.nick or "") in self.mutes
                                     or "@" + s.subnet in self.mutes)

    def _banned(self, key: str) -> bool:
        entry = self.bans.get(key)
        if entry is None:
            return False
        if entry[1] <= time.time():
            del self.bans[key]
            return False
        return True

    def nick_banned(self, nick: str) -> bool:
        return self._banned(nick_key(nick))

    def address_banned(self, address: str) -> bool:
        return self._banned("@" + address)


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


def _raise_open_files(wanted: int) -> None:
    """Raise this process's open-files limit towards `wanted` where the OS allows."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


# ===========================================================================
# 3b. IRC gateway -- IrcWire: lets any IRC client (irssi, WeeChat, HexChat)
#     into the same rooms, on the same port (a first line that does not start
#     with "{" is IRC) or on --irc-port.  Uses: constants, protocol, server.
#
# IRC commands become the server's own requests, run by the same handlers,
# so every rule (flood, backlog, bans, mutes, nick uniqueness) is the same
# for everyone.  The events the server tells an IRC session become IRC lines
# as they are told (a broadcast's lines are rendered once for all IRC
# members).  RFC 1459 / RFC 2812 for one server, as clients expect it.
# ===========================================================================

IRC_MAX_LINE = 512             # bytes, CRLF included
IRC_USER = "pychat"            # the user part of nick!user@host prefixes
IRC_MAX_TAGS = 8191            # bytes of IRCv3 tags allowed before a line's 512
_IRC_BREAKS = re.compile("[\r\n\0]")  # what would end an IRC line early

# Numeric replies, named as in RFC 2812 and modern.ircdocs.horse.
RPL_WELCOME = "001"
RPL_YOURHOST = "002"
RPL_CREATED = "003"
RPL_MYINFO = "004"
RPL_ISUPPORT = "005"
RPL_UMODEIS = "221"
RPL_LUSERCLIENT = "251"
RPL_LUSERCHANNELS = "254"
RPL_LUSERME = "255"
RPL_AWAY = "301"
RPL_USERHOST = "302"
RPL_ISON = "303"
RPL_UNAWAY = "305"
RPL_NOWAWAY = "306"
RPL_WHOISUSER = "311"
RPL_WHOISSERVER = "312"
RPL_WHOISOPERATOR = "313"
RPL_ENDOFWHO = "315"
RPL_ENDOFWHOIS = "318"
RPL_WHOISCHANNELS = "319"
RPL_LISTSTART = "321"
RPL_LIST = "322"
RPL_LISTEND = "323"
RPL_CHANNELMODEIS = "324"
RPL_NOTOPIC = "331"
RPL_TOPIC = "332"
RPL_TOPICWHOTIME = "333"
RPL_ENDOFINVITELIST = "347"
RPL_ENDOFEXCEPTLIST = "349"
RPL_VERSION = "351"
RPL_WHOREPLY = "352"
RPL_NAMREPLY = "353"
RPL_ENDOFNAMES = "366"
RPL_ENDOFBANLIST = "368"
RPL_MOTD = "372"
RPL_MOTDSTART = "375"
RPL_ENDOFMOTD = "376"
ERR_NOSUCHNICK = "401"
ERR_NOSUCHCHANNEL = "403"
ERR_CANNOTSENDTOCHAN = "404"
ERR_TOOMANYCHANNELS = "405"
ERR_NOORIGIN = "409"
ERR_INVALIDCAPCMD = "410"
ERR_NORECIPIENT = "411"
ERR_NOTEXTTOSEND = "412"
ERR_UNKNOWNCOMMAND = "421"
ERR_NOMOTD = "422"
ERR_NONICKNAMEGIVEN = "431"
ERR_ERRONEUSNICKNAME = "432"
ERR_NICKNAMEINUSE = "433"
ERR_NOTONCHANNEL = "442"
ERR_NOTREGISTERED = "451"
ERR_NEEDMOREPARAMS = "461"
ERR_ALREADYREGISTERED = "462"
ERR_PASSWDMISMATCH = "464"
ERR_YOUREBANNEDCREEP = "465"
ERR_BANNEDFROMCHAN = "474"
ERR_NOPRIVILEGES = "481"
ERR_CHANOPRIVSNEEDED = "482"
ERR_USERSDONTMATCH = "502"
ERR_INPUTTOOLONG = "417"
ERR_USERNOTINCHANNEL = "441"
RPL_LOGGEDIN = "900"
RPL_SASLSUCCESS = "903"
ERR_SASLFAIL = "904"
ERR_SASLABORTED = "906"
RPL_SASLMECHS = "908"

# IRCv3 capabilities offered (https://ircv3.net/specs): each one fully works
# (and sasl, PLAIN, where the server has a password).
IRC_CAPS = ("away-notify", "batch", "cap-notify", "draft/chathistory", "echo-message",
            "message-tags", "multi-prefix", "server-time", "userhost-in-names")
CHATHISTORY_MAX = 100          # messages one CHATHISTORY request may ask for
IRC_MODES = 4                  # mode changes in one MODE line

# PyChat error codes -> IRC numerics (and what the numeric's parameter is).
IRC_ERRORS = {
    "no_such_nick": ERR_NOSUCHNICK, "no_such_room": ERR_NOSUCHCHANNEL,
    "not_in_room": ERR_NOTONCHANNEL, "room_invalid": ERR_NOSUCHCHANNEL,
    "too_many_rooms": ERR_TOOMANYCHANNELS, "nick_invalid": ERR_ERRONEUSNICKNAME,
    "nick_taken": ERR_NICKNAMEINUSE, "not_registered": ERR_NOTREGISTERED,
    "already_registered": ERR_ALREADYREGISTERED, "auth_failed": ERR_PASSWDMISMATCH,
    "not_operator": ERR_NOPRIVILEGES, "muted": ERR_CANNOTSENDTOCHAN,
    "empty": ERR_NOTEXTTOSEND, "banned": ERR_YOUREBANNEDCREEP,
    "banned_from_room": ERR_BANNEDFROMCHAN,
}


def irc_split(text: str, budget: int) -> list[str]:
    """Split text into pieces of at most `budget` UTF-8 bytes, at spaces where
    possible and never inside a character.  Linear: the text is encoded once
    and cut as bytes."""
    pieces: list[str] = []
    for line in text.split("\n"):
        data = line.encode("utf-8")
        start = 0
        while len(data) - start > budget:
            end = start + budget
            while end > start and data[end] & 0xC0 == 0x80:  # inside a character
                end -= 1
            # At a space in the window's last fifth; else by bytes (a cut at an
            # early space would leave a line of one word, or of just "[12:05]").
            space = data.rfind(b" ", start + budget * 4 // 5, end + 1)
            cut = space if space > start else end
            pieces.append(data[start:cut].decode("utf-8"))
            start = cut
            while start < len(data) and data[start] == 0x20:
                start += 1
        pieces.append(data[start:].decode("utf-8"))
    return [p for p in pieces if p] or [""]


def is_room_op(room: Room, s: Session) -> bool:
    """The @ of IRC: an operator of the room, or of the whole server."""
    return s.operator or nick_key(s.nick or "") in room.ops


def irc_match(mask: str, text: str) -> bool:
    """IRC wildcards (* any run, ? one character), case-folded as nicks are.
    Matched greedily with one backtrack point, in time linear in the lengths
    (a regular expression of many *s can take exponential time)."""
    mask, text = nick_key(mask), nick_key(text)
    m = t = 0
    star, mark = -1, 0
    while t < len(text):
        if m < len(mask) and mask[m] in ("?", text[t]):
            m += 1
            t += 1
        elif m < len(mask) and mask[m] == "*":
            star, mark = m, t
            m += 1
        elif star >= 0:
            m, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    return mask[m:].strip("*") == ""


def chathistory_ref(text: str) -> tuple[str, float] | None:
    """A CHATHISTORY reference: * (None), msgid=ID or timestamp=ISO-8601;
    ValueError for anything else."""
    if text == "*":
        return None
    kind, _, value = text.partition("=")
    if kind == "msgid":
        return ("msgid", float(int(value)))
    if kind == "timestamp":
        stamp = datetime.datetime.strptime(value.rstrip("Z").split(".")[0], "%Y-%m-%dT%H:%M:%S")
        fraction = float("0." + value.rstrip("Z").split(".")[1]) if "." in value else 0.0
        return ("ts", stamp.replace(tzinfo=datetime.timezone.utc).timestamp() + fraction)
    raise ValueError(text)


def irc_time(ts: float) -> str:
    """A server-time tag's value: UTC, milliseconds, as IRCv3 wants it."""
    ms = round(float(ts) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


_TAG_ESCAPES = {";": "\\:", " ": "\\s", "\\": "\\\\", "\r": "\\r", "\n": "\\n"}
_TAG_UNESCAPES = {v[1]: k for k, v in _TAG_ESCAPES.items()}


def irc_tags(text: str) -> dict[str, str]:
    """'+a=1;+b;time=x' -> {'+a': '1', '+b': '', 'time': 'x'} (values unescaped)."""
    tags = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        if key:
            tags[key] = re.sub(r"\\(.?)", lambda m: _TAG_UNESCAPES.get(m.group(1), m.group(1)),
                               value)
    return tags


def irc_tag_text(tags: dict[str, str]) -> str:
    """The inverse of irc_tags: '@k=v;k2 ' with values escaped."""
    return "@" + ";".join(k + ("=" + "".join(_TAG_ESCAPES.get(c, c) for c in v) if v else "")
                          for k, v in tags.items()) + " "


def irc_parse(line: str) -> tuple[str, list[str]]:
    """'CMD a b :c d' -> ('CMD', ['a', 'b', 'c d']); tags and prefix dropped."""
    if line.startswith("@"):
        line = line.partition(" ")[2]
    if line.startswith(":"):
        line = line.partition(" ")[2]
    line = line.lstrip(" ")
    head, sep, trailing = line.partition(" :")
    params = head.split()
    if sep:
        params.append(trailing)
    return (params[0].upper() if params else ""), params[1:]


def irc_of(s: Session) -> IrcWire | None:
    """A session's IRC wire, if it came by IRC."""
    return s.wire if isinstance(s.wire, IrcWire) else None


def irc_identity(s: Session, here: str) -> tuple[str, str, str]:
    """Someone's user name, host and real name as IRC shows them: a remote
    user's as her network says, an IRC user's own (at this server, `here`),
    else PyChat's."""
    if s.remote:
        return s.user, s.host, s.realname  # type: ignore[attr-defined]
    wire = irc_of(s)
    if wire is not None:
        return wire.user or IRC_USER, here, wire.realname or str(s.nick)
    return IRC_USER, here, "a PyChat user"


def irc_line(text: str) -> bytes:
    """Every IRC line leaves through here, to a client or to the network:
    one line, whatever its parts held (a CR, LF or NUL from a real name or
    a reason would let a user forge lines for others), at most 512 bytes
    with its CRLF, never cut inside a character."""
    data = _IRC_BREAKS.sub(" ", text).encode("utf-8")[:IRC_MAX_LINE - 2]
    return data.decode("utf-8", "ignore").encode("utf-8") + b"\r\n"


class IrcWire(Wire):
    """The IRC side of one Session: IRC lines in, the core's requests out;
    the core's events in, IRC lines out."""

    native = False
    joins_lobby = False  # IRC users choose their channels themselves
    json_requests = False  # IRC lines, translated into requests

    def __init__(self, server: ChatServer, session: Session):
        super().__init__(server, session)
        self.name = server.cfg.server_name
        self.context = ""              # the command being answered (for error numerics)
        self.caps: set[str] = set()    # IRCv3 capabilities this client asked for
        self.plain = True              # no capabilities: room messages as shared() has them
        self.negotiating = False       # CAP LS/REQ before registration: wait for CAP END
        self.sasl: str | None = None   # AUTHENTICATE PLAIN: the base64 received so far
        self.in_tags: dict[str, str] = {}  # the client tags of the line being handled
        self.batches = 0               # batch references given out
        self.v302 = False              # it said CAP LS 302
        self.last_error = ""           # the code of the last error it was told
        self.nick = ""                 # asked for before registration
        self.user = ""
        self.realname = ""
        self.password: str | None = None
        self.registered = False
        # One QUIT per user leaving, though her leave reaches it from several
        # shared channels: her leave events share their ts, and the channels
        # may write them in different ticks (joins and leaves are batched).
        self.quits_sent: set[tuple[str, Any]] = set()
        self.replay: collections.deque[Room] = collections.deque()  # history still to send
        self.replay_busy = False       # a room's history was replayed this tick

    # --- output
    def me(self) -> str:
        return self.s.nick or self.nick or "*"

    line = staticmethod(irc_line)

    def numeric(self, code: str, *params: str, text: str | None = None) -> bytes:
        middle = " ".join([self.me(), *params])
        return self.line(f":{self.name} {code} {middle}" + ("" if text is None else f" :{text}"))

    def prefix(self, nick: Any, now: Any = None) -> str:
        """nick!user@server for a user (`now`: the nick she has now, after a
        NICK), with her own USER name if she came by IRC."""
        other = self.server.nicks.get(nick_key(str(now or nick)))
        if other is None:
            return f"{nick}!{IRC_USER}@{self.name}"
        user, host, _ = irc_identity(other, self.name)
        return f"{nick}!{user}@{host}"

    def say(self, nick: str, command: str, target: str, text: str,
            action: bool = False) -> list[bytes]:
        """PRIVMSG/NOTICE lines, split to fit IRC's 512 bytes."""
        head = f":{self.prefix(nick)} {command} {target} :"
        budget = IRC_MAX_LINE - 2 - len(head.encode("utf-8")) - (9 if action else 0)
        return [self.line(head + (f"\x01ACTION {p}\x01" if action else p))
                for p in irc_split(text, max(budget, 50))]

    def send(self, *lines: bytes) -> None:
        for data in lines:
            self.s.send(data)

    # --- events from the core
    def tell(self, event: dict) -> None:
        # (an answer to auth may come late, outside its command: it says so)
        context = "AUTHENTICATE" if event.get("request") == "auth" else self.context
        self.send(*self.extras(event, self.translate(event, context)))
        if event.get("code") == "auth_failed" and not self.registered and \
                event.get("type") == "error" and context != "AUTHENTICATE":
            # IRC has no second try at PASS: 464, then goodbye (SASL may try again)
            self.send(self.line("ERROR :Closing link: wrong or missing password (PASS)"))
            self.s.close("auth_failed")

    def render(self, e: dict) -> list[bytes] | None:
        """A broadcast's lines, the same for every IRC member (None: it is
        different for each, see translate)."""
        try:
            return self.shared_lines(e)
        except (KeyError, TypeError, ValueError):
            log.exception("could not translate an event for IRC")
            return []

    def shared(self, e: dict, rendered: list[bytes] | None) -> tuple[bytes | None, str | None]:
        """A room message: the same bytes for every member without
        capabilities, but its sender (IRC clients show their own lines)."""
        if rendered is not None and e.get("type") == "msg":
            return b"".join(rendered), e["from"]
        return None, None

    def take(self, e: dict, rendered: list[bytes] | None) -> None:
        if self.wanted(e):
            self.s.out.extend(self.extras(e, rendered if rendered is not None
                                          else self.translate(e)))

    def take_presence(self, events: list[dict], rendered: list[list[bytes] | None],
                      shared: dict) -> None:
        """A tick's JOIN/PART/QUIT lines: one buffer, built once for every
        IRC member without capabilities that change lines (its own tags, an
        AWAY after a JOIN) when no QUIT could come twice; else line by line."""
        data = shared.get("plain")
        if data is None:
            simple = all(r is not None for r in rendered) and all(
                e["type"] == "join" or e.get("reason") in ("part", "kick") for e in events)
            data = shared["plain"] = b"".join(line for lines in rendered  # type: ignore
                                              for line in lines) if simple else b""
        if data and not self.caps:
            self.s.out.append(data)
        else:
            super().take_presence(events, rendered, shared)

    def extras(self, e: dict, lines: list[bytes]) -> list[bytes]:
        """What this client's capabilities add: an AWAY after the JOIN of
        someone away (away-notify), and one tag section on every line: the
        event's time (server-time) and the sender's own tags (message-tags)."""
        if not self.caps or not lines:
            return lines
        if "away-notify" in self.caps and e.get("type") == "join" and \
                e.get("away") is not None:
            lines = lines + [self.line(f":{self.prefix(e['nick'])} AWAY :{e['away'] or 'away'}")]
        tags = {}
        if "server-time" in self.caps and isinstance(e.get("ts"), (int, float)):
            tags["time"] = irc_time(e["ts"])
        first = dict(tags)  # the message's own tags go on its first piece only
        if "message-tags" in self.caps:
            if e.get("type") == "typing":
                first["+typing"] = "active"
            elif isinstance(e.get("tags"), dict):
                first.update(e["tags"])
            if e.get("type") in ("msg", "pm") and isinstance(e.get("id"), int):
                first["msgid"] = str(e["id"])  # what CHATHISTORY's msgid= refers to
        if first:
            rest = irc_tag_text(tags).encode("utf-8") if tags else b""
            lines = [irc_tag_text(first).encode("utf-8") + lines[0]] + \
                [rest + line for line in lines[1:]]
        return lines

    def wanted(self, e: dict) -> bool:
        """False for what this client must not see again: its own messages
        (IRC clients show them themselves) and a second QUIT of one user
        (who left several shared channels) in one tick."""
        kind = e.get("type")
        if kind in ("msg", "tagmsg"):  # (echo-message: its own lines back, if it asks)
            if kind == "tagmsg" and "message-tags" not in self.caps:
                return False
            # (an event's "from" is its sender's nick exactly as she has it)
            return str(e.get("from")) != self.me() or "echo-message" in self.caps
        if kind == "leave" and e.get("reason") not in ("part", "kick"):
            seen = (str(e.get("nick")), e.get("ts"))
            if seen in self.quits_sent:
                return False
            if len(self.quits_sent) >= 64:  # bounded: a user's leaves come within a second
                self.quits_sent.clear()
            self.quits_sent.add(seen)
        return True

    def shared_lines(self, e: dict) -> list[bytes] | None:
        kind = e.get("type")
        if kind == "msg":
            return self.say(e["from"], "NOTICE" if e.get("notice") else "PRIVMSG", e["room"],
                            e["text"], bool(e.get("action")))
        if kind == "join":
            return [self.line(f":{self.prefix(e['nick'])} JOIN {e['room']}")]
        if kind == "leave":
            if e.get("reason") == "part":
                message = f" :{e['message']}" if e.get("message") else ""
                return [self.line(f":{self.prefix(e['nick'])} PART {e['room']}{message}")]
            if e.get("reason") == "kick":
                return [self.line(f":{self.prefix(e.get('by') or self.name)} KICK {e['room']} "
                                  f"{e['nick']} :{e.get('message') or e.get('by')}")]
            why = e.get("message") or e.get("reason") or "Quit"
            return [self.line(f":{self.prefix(e['nick'])} QUIT :{why}")]
        if kind == "topic":
            return [self.line(f":{self.prefix(e.get('by') or self.name)} TOPIC {e['room']} "
                              f":{e.get('topic', '')}")]
        if kind == "mode":
            return [self.line(f":{self.prefix(e.get('by') or self.name)} MODE {e['room']} "
                              f"{'+' if e.get('op') else '-'}o {e['nick']}")]
        if kind == "tagmsg" and e.get("room"):
            return [self.line(f":{self.prefix(e['from'])} TAGMSG {e['room']}")]
        return None

    def translate(self, e: dict, command: str = "") -> list[bytes]:
        """One PyChat event as IRC lines for this client."""
        try:
            return self._translate(e, command)
        except (KeyError, TypeError, ValueError):
            log.exception("could not translate an event for IRC")
            return []

    def _translate(self, e: dict, command: str) -> list[bytes]:
        if not self.wanted(e):
            return []
        shared = self.shared_lines(e)
        if shared is not None:
            return shared
        kind, me = e.get("type"), nick_key(self.me())
        if kind == "pm":
            return self.private(e, me)
        if kind == "nick":
            if nick_key(str(e["old"])) == me:
                self.nick = e["new"]
            return [self.line(f":{self.prefix(e['old'], e['new'])} NICK :{e['new']}")]
        if kind == "welcome":
            return self.welcome(e)
        if kind == "tagmsg":  # to one person
            to = str(e.get("to")) if nick_key(str(e.get("from"))) == me else self.me()
            return [self.line(f":{self.prefix(e['from'])} TAGMSG {to}")]
        if kind == "typing" and "message-tags" in self.caps:  # +typing: see extras
            return [self.line(f":{self.prefix(e['nick'])} TAGMSG {e['room']}")]
        if kind == "ping":
            return [self.line(f"PING :{e.get('data', self.name)}")]
        if kind == "pong":
            return [self.line(f":{self.name} PONG {self.name} :{e.get('data', '')}")]
        if kind == "away" and nick_key(str(e.get("nick"))) == me:
            return [self.numeric(RPL_NOWAWAY, text="You have been marked as being away")
                    if e.get("away") else
                    self.numeric(RPL_UNAWAY, text="You are no longer marked as being away")]
        if kind == "away" and "away-notify" in self.caps:
            return [self.line(f":{self.prefix(e['nick'])} AWAY"
                              + (f" :{e.get('message') or 'away'}" if e.get("away") else ""))]
        if kind == "notice" and e.get("split") and e.get("room"):
            return self.split_lines(e)
        if kind == "notice" and e.get("away") is not None:
            return [self.numeric(RPL_AWAY, str(e.get("nick")), text=str(e.get("away") or "away"))]
        if kind == "moderation":
            return [self.line(f":{self.name} NOTICE {self.me()} :{e.get('by')} did "
                              f"{e.get('action')} {e.get('nick')}"
                              + (f": {e['reason']}" if e.get("reason") else ""))]
        if kind == "bye":
            return [self.line(f"ERROR :Closing link: {e.get('reason', '')}")]
        if kind == "error" and command == "AUTHENTICATE":
            if e.get("code") == "auth_blocked":
                return [self.line(f"ERROR :Closing link: {e.get('message')}")]
            return [self.numeric(ERR_SASLFAIL, text="SASL authentication failed")]
        if kind == "error":
            return self.error(e, command)
        if kind == "auth":  # SASL PLAIN accepted (accounts are just the nick here)
            who = self.nick or "*"
            return [self.numeric(RPL_LOGGEDIN, self.prefix(who), who,
                                 text=f"You are now logged in as {who}"),
                    self.numeric(RPL_SASLSUCCESS, text="SASL authentication successful")]
        return []  # typing, users, history, rooms...: IRC asks for those itself

    def split_lines(self, e: dict) -> list[bytes]:
        """A netsplit or netjoin in a room (one notice, section 3e) as IRC
        clients know it: a QUIT "hub leaf" or a JOIN for each one, which
        they fold into one line of their own."""
        nicks = [str(n) for n in e.get("nicks") or ()]
        if e.get("joined"):
            return [self.line(f":{self.prefix(n)} JOIN {e['room']}") for n in nicks]
        between = e.get("between") or f"{e['split']} {self.name}"
        return [self.line(f":{n}!{IRC_USER}@{e['split']} QUIT :{between}") for n in nicks]

    def private(self, e: dict, me: str) -> list[bytes]:
        """A private message (or NOTICE, or CTCP) to or from this IRC user."""
        to = self.me()
        if nick_key(str(e.get("from"))) == me and nick_key(str(e.get("to"))) != me:
            if "echo-message" not in self.caps:
                return []  # her own line: the client shows it itself
            to = str(e.get("to"))
        command = "NOTICE" if e.get("notice") else "PRIVMSG"
        if e.get("ctcp"):  # relayed between IRC users unchanged (and whole)
            head = f":{self.prefix(e['from'])} {command} {to} :\x01"
            room = IRC_MAX_LINE - 3 - len(head.encode("utf-8"))
            body = e["text"].encode("utf-8")[:max(room, 0)].decode("utf-8", "ignore")
            return [self.line(f"{head}{body}\x01")]
        return self.say(e["from"], command, to, e["text"], bool(e.get("action")))

    def error(self, e: dict, context: str) -> list[bytes]:
        code = self.last_error = str(e.get("code"))
        message = str(e.get("message") or ERRORS.get(code, code))
        if context.startswith("NOTICE "):
            return []  # RFC 2812: no automatic replies to a NOTICE
        numeric = IRC_ERRORS.get(code)
        target = context.partition(" ")[2] or "*"
        if code == "not_operator" and context.startswith(("MODE #", "KICK #")):
            numeric, message = ERR_CHANOPRIVSNEEDED, "You're not channel operator"
            target = target.split(" ")[0]
        if code == "no_such_nick" and context.startswith(("MODE #", "KICK #")):
            chan, _, nick = target.partition(" ")  # 441 <nick> <channel>
            return [self.numeric(ERR_USERNOTINCHANNEL, nick, chan,
                                 text="They aren't on that channel")]
        if code == "not_in_room" and context.startswith("PRIVMSG "):
            numeric, message = ERR_CANNOTSENDTOCHAN, "Cannot send to channel (join it first)"
        if code in ("flooding", "line_too_long", "auth_blocked", "server_full",
                    "too_many_connections", "connecting_too_fast") or (
                code == "banned" and not self.registered):
            return [self.line(f"ERROR :Closing link: {message}")]
        if numeric is None:
            return [self.line(f":{self.name} NOTICE {self.me()} :{message}")]
        if numeric in (ERR_NOTREGISTERED, ERR_ALREADYREGISTERED, ERR_PASSWDMISMATCH,
                       ERR_YOUREBANNEDCREEP, ERR_NOPRIVILEGES, ERR_NOTEXTTOSEND):
            return [self.numeric(numeric, text=message)]
        return [self.numeric(numeric, target, text=message)]

    def welcome(self, e: dict) -> list[bytes]:
        nick, srv = self.me(), self.server
        lines = [
            self.numeric(RPL_WELCOME, text=f"Welcome to the PyChat IRC gateway {self.prefix(nick)}"),
            self.numeric(RPL_YOURHOST, text=f"Your host is {self.name}, running PyChat-{__version__}"),
            self.numeric(RPL_CREATED, text="This server was created when it started"),
            self.line(f":{self.name} {RPL_MYINFO} {nick} {self.name} PyChat-{__version__} i n"),
            self.numeric(RPL_ISUPPORT, "CHANTYPES=#", f"NICKLEN={MAX_NICK_LEN}",
                         f"CHANNELLEN={MAX_ROOM_LEN}", f"TOPICLEN={MAX_TOPIC}",
                         f"AWAYLEN={MAX_AWAY}", "CASEMAPPING=ascii", "NETWORK=PyChat",
                         "PREFIX=(o)@", "CHANMODES=,,,n", f"CHANLIMIT=#:{srv.cfg.max_rooms_per_user}",
                         "MAXTARGETS=4", text="are supported by this server"),
            self.numeric(RPL_ISUPPORT, f"MODES={IRC_MODES}", f"CHATHISTORY={CHATHISTORY_MAX}",
                         "MSGREFTYPES=msgid,timestamp", text="are supported by this server")]
        return lines + self.motd()

    def motd(self) -> list[bytes]:
        if not self.server.cfg.motd:
            return [self.numeric(ERR_NOMOTD, text="MOTD File is missing")]
        return ([self.numeric(RPL_MOTDSTART, text=f"- {self.name} Message of the day -")]
                + [self.numeric(RPL_MOTD, text=f"- {part}") for part in self.server.cfg.motd.split("\n")]
                + [self.numeric(RPL_ENDOFMOTD, text="End of /MOTD command.")])

    # --- room state, asked for by the server on joining
    def joined(self, room: Room, after: int | None = None) -> None:
        """JOIN, topic, NAMES, then the recent history, as a JOIN reply goes.
        History is replayed one room per tick and only while the client reads
        (see Session.resume_writing), so JOIN #a,#b,... with 50 full rooms
        neither builds everything at once nor piles up for a client that
        does not read."""
        self.send(self.line(f":{self.prefix(self.me())} JOIN {room.name}"))
        if room.topic:
            self.send(*self.topic_lines(room))
        self.send(*self.names(room))
        if room.history:
            if room in self.replay:  # joined, left and joined again: replay it once
                self.replay.remove(room)
            self.replay.append(room)
            if not self.replay_busy:
                self.replay_next()

    def replay_next(self) -> None:
        """Replay the next room's history, unless one was replayed this tick or
        the client has not read the last one yet (resume_writing calls again
        when it has)."""
        s = self.s
        while self.replay and s.rooms.get(nick_key(self.replay[0].name)) is not self.replay[0]:
            self.replay.popleft()  # left meanwhile (PART, JOIN 0): nothing to replay
        if not self.replay or s.closing or s.paused:
            return
        room = self.replay.popleft()
        if not self.server.may_send_history(s, room, 2 * room.history_bytes + 64):
            return  # owed too much already: dropped like any slow reader
        lines = self.history_lines(room.name, list(room.history))
        self.send(*lines)
        self.replay_busy = True  # the next room in a later tick, after this one is written
        s.server.loop.call_soon(self._replay_later)

    def history_lines(self, target: str, messages: list[dict]) -> list[bytes]:
        """Stored messages as this client wants them: with server-time each
        keeps its own time as a tag (and its msgid with message-tags), else a
        "[12:05]" prefix says when; a chathistory batch if it has batch."""
        lines: list[bytes] = []
        tagged = "server-time" in self.caps
        for m in messages:
            command = "NOTICE" if m.get("notice") else "PRIVMSG"
            if tagged:  # the text stays as it was sent
                said = self.say(m["from"], command, target, m["text"], bool(m.get("action")))
            else:
                stamp = time.strftime("%H:%M", time.localtime(float(m.get("ts") or 0)))
                action = "* " if m.get("action") else ""  # "[12:05] * waves"
                said = self.say(m["from"], command, target, f"[{stamp}] {action}{m['text']}")
            lines += self.extras(m, said)
        return self.batched("chathistory", target, lines)

    def batched(self, kind: str, target: str, lines: list[bytes]) -> list[bytes]:
        """Lines inside a batch of `kind`, for a client that has batch."""
        if "batch" not in self.caps:
            return lines
        self.batches += 1
        ref = f"h{self.batches}"
        tag = f"batch={ref}".encode()
        inner = [b"@" + tag + b";" + line[1:] if line.startswith(b"@") else b"@" + tag + b" " + line
                 for line in lines]
        return ([self.line(f":{self.name} BATCH +{ref} {kind}" + (f" {target}" if target else ""))]
                + inner + [self.line(f":{self.name} BATCH -{ref}")])

    def on_chathistory(self, params: list[str]) -> None:
        """draft/chathistory: LATEST, BEFORE, AFTER, AROUND, BETWEEN (msgid= or
        timestamp= references, or * for LATEST) and TARGETS, from the rooms'
        kept history; private messages are never kept, so they have none."""
        sub = params[0].upper() if params else ""
        if "draft/chathistory" not in self.caps or sub not in (
                "LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN", "TARGETS"):
            self.send(self.line(f":{self.name} FAIL CHATHISTORY UNKNOWN_COMMAND {sub or '*'} "
                                ":Unknown CHATHISTORY subcommand"))
            return
        fail = self.line(f":{self.name} FAIL CHATHISTORY INVALID_PARAMS {sub} "
                         ":Invalid parameters")
        if sub == "TARGETS":
            self.chathistory_targets(params, fail)
            return
        if len(params) < (5 if sub == "BETWEEN" else 4) or not (
                params[-1].isascii() and params[-1].isdigit()) or len(params[-1]) > 6:
            self.send(fail)
            return
        target, limit = params[1], min(int(params[-1]), CHATHISTORY_MAX)
        room = self.server.rooms.get(nick_key(target)) if target.startswith("#") else None
        if target.startswith("#") and (room is None or nick_key(room.name) not in self.s.rooms):
            self.send(self.line(f":{self.name} FAIL CHATHISTORY INVALID_TARGET {sub} {target} "
                                ":You are not in that channel"))
            return
        messages = list(room.history) if room else []
        try:
            refs = [chathistory_ref(p) for p in params[2:-1]]
        except ValueError:
            self.send(fail)
            return
        def after(m: dict, ref: tuple[str, float]) -> bool:
            return (m["id"] if ref[0] == "msgid" else m["ts"]) > ref[1]

        def before(m: dict, ref: tuple[str, float]) -> bool:
            return (m["id"] if ref[0] == "msgid" else m["ts"]) < ref[1]
        if sub == "LATEST":
            picked = [m for m in messages if refs[0] is None or after(m, refs[0])][-limit:]
        elif None in refs:
            self.send(fail)
            return
        elif sub == "BEFORE":
            picked = [m for m in messages if before(m, refs[0])][-limit:]
        elif sub == "AFTER":
            picked = [m for m in messages if after(m, refs[0])][:limit]
        elif sub == "AROUND":
            older = [m for m in messages if before(m, refs[0])][-(limit // 2):] if limit > 1 \
                else []
            picked = older + [m for m in messages if not before(m, refs[0])][:limit - len(older)]
        else:  # BETWEEN, in either order
            low, high = sorted(refs, key=lambda r: r[1]) if refs[0][0] == refs[1][0] else refs
            picked = [m for m in messages if after(m, low) and before(m, high)][:limit]
        if room is not None and not self.server.may_send_history(
                self.s, room, sum(len(m["text"]) for m in picked) + 100 * len(picked)):
            return  # it owes too much already: dropped like any slow reader
        self.send(*self.history_lines(room.name if room else target, picked))
        self.s.flush()  # written now: the next request in this tick sees it owed

    def chathistory_targets(self, params: list[str], fail: bytes) -> None:
        """CHATHISTORY TARGETS: your rooms whose newest message falls between two times."""
        try:
            low, high = sorted(chathistory_ref(p)[1] for p in params[1:3])  # type: ignore
            limit = min(int(params[3]), CHATHISTORY_MAX)
        except (ValueError, TypeError, IndexError):
            self.send(fail)
            return
        rooms = sorted((r for r in self.s.rooms.values()
                        if r.history and low <= r.history[-1]["ts"] <= high),
                       key=lambda r: r.history[-1]["ts"])[:limit]
        lines = [self.line(f":{self.name} CHATHISTORY TARGETS {r.name} "
                           f"{irc_time(r.history[-1]['ts'])}") for r in rooms]
        self.send(*self.batched("draft/chathistory-targets", "", lines))

    def _replay_later(self) -> None:
        self.replay_busy = False
        self.replay_next()

    def topic_lines(self, room: Room) -> list[bytes]:
        return [self.numeric(RPL_TOPIC, room.name, text=room.topic),
                self.line(f":{self.name} {RPL_TOPICWHOTIME} {self.me()} {room.name} "
                          f"{self.prefix(room.topic_by) if room.topic_by else self.name}"
                          f" {int(room.topic_ts)}")]

    def names(self, room: Room) -> list[bytes]:
        nicks = room.nicks()
        lines, batch = [], []
        full = "userhost-in-names" in self.caps
        for nick in nicks:
            batch.append(("@" if is_room_op(room, room.members[nick_key(nick)]) else "")
                         + (self.prefix(nick) if full else nick))
            if len(" ".join(batch).encode("utf-8")) > 380:  # bytes: the line is 512 bytes
                lines.append(self.numeric(RPL_NAMREPLY, "=", room.name, text=" ".join(batch)))
                batch = []
        if batch:
            lines.append(self.numeric(RPL_NAMREPLY, "=", room.name, text=" ".join(batch)))
        return lines + [self.numeric(RPL_ENDOFNAMES, room.name, text="End of /NAMES list.")]

    def resume(self) -> None:
        self.replay_next()

    # --- input
    def receive(self, raw: bytes) -> None:
        self.in_tags = {}
        if raw.startswith(b"@"):  # IRCv3 tags: up to 8191 bytes before the 512
            head, _, raw = raw.partition(b" ")
            if len(head) > IRC_MAX_TAGS:
                self.send(self.numeric(ERR_INPUTTOOLONG, text="Input line was too long"))
                return
            if "message-tags" in self.caps:
                self.in_tags = {k: v for k, v in irc_tags(head[1:].decode("utf-8", "replace"))
                                .items() if k.startswith("+")}  # only clients' own tags
        text = raw[:IRC_MAX_LINE - 2].decode("utf-8", "replace")
        command, params = irc_parse(text)
        if not command:
            return
        handler = IRC_COMMANDS.get(command)  # looked up apart from the call: a bug is no 421
        if not self.registered and command not in IRC_BEFORE_REGISTRATION:
            self.send(self.numeric(ERR_NOTREGISTERED, command, text="You have not registered"))
            return
        if handler is None:
            self.send(self.numeric(ERR_UNKNOWNCOMMAND, command, text="Unknown command"))
            return
        handler(self, params)

    def request(self, context: str, **msg: Any) -> None:
        """Run a PyChat request for this client, exactly as a JSON client's
        would run; what it answers is translated as it is told, with
        `context` (the IRC command) for the error numerics."""
        outer, self.context = self.context, context
        try:
            try:
                validate(msg)
            except ProtocolError as e:
                self.tell(error(e.code, e.message, request=msg["type"]))
                return
            self.server.handlers[msg["type"]](self.s, msg)
        finally:
            self.context = outer

    def extra_token(self) -> bool:
        """The line paid for its first target; each further one (JOIN #a,#b,
        PART, PRIVMSG a,b) pays a flood token of its own."""
        return self.server._take_token(self.s)

    def need(self, params: list[str], count: int, command: str) -> bool:
        if len(params) < count or (count and not params[count - 1]):
            self.send(self.numeric(ERR_NEEDMOREPARAMS, command, text="Not enough parameters"))
            return False
        return True

    def on_cap(self, params: list[str]) -> None:
        """IRCv3 capability negotiation (CAP 302): LS or REQ before
        registration holds it until CAP END."""
        sub = params[0].upper() if params else ""
        head = f":{self.name} CAP {self.s.nick or '*'}"  # "*" until registered
        if sub == "LS":
            self.negotiating = not self.registered
            v302 = bool(params[1:2] and params[1].isdigit() and int(params[1][:4]) >= 302)
            self.v302 = self.v302 or v302
            if v302:
                self.caps.add("cap-notify")  # implied by CAP LS 302
            offered = [("sasl=PLAIN" if v302 else c) if c == "sasl" else c
                       for c in self.offered()]
            self.send(self.line(f"{head} LS :{' '.join(offered)}"))
        elif sub == "LIST":
            self.send(self.line(f"{head} LIST :{' '.join(sorted(self.caps))}"))
        elif sub == "REQ":
            self.negotiating = not self.registered
            wanted = params[1].split() if params[1:] else []
            known = all(name.lstrip("-") in self.offered() for name in wanted) and not (
                "-cap-notify" in wanted and self.v302)  # CAP 302 keeps cap-notify on
            self.send(self.line(f"{head} {'ACK' if known and wanted else 'NAK'} "
                                f":{' '.join(wanted)}"))
            if known:  # all or nothing, as the spec says
                for name in wanted:
                    (self.caps.discard if name.startswith("-") else self.caps.add)(
                        name.lstrip("-"))
        elif sub == "END":
            if self.negotiating:
                self.negotiating = False
                self.register()
        else:
            self.send(self.numeric(ERR_INVALIDCAPCMD, sub or "*",
                                   text="Invalid CAP command"))
        self.plain = not self.caps

    def on_pass(self, params: list[str]) -> None:
        if self.registered:
            self.send(self.numeric(ERR_ALREADYREGISTERED, text="You may not reregister"))
        elif self.need(params, 1, "PASS"):
            self.password = params[0]

    def on_nick(self, params: list[str]) -> None:
        if not params or not params[0]:
            self.send(self.numeric(ERR_NONICKNAMEGIVEN, text="No nickname given"))
            return
        nick = params[0]
        if self.registered:
            self.request(f"NICK {nick}", type="nick", nick=nick)
            return
        problem = nick_problem(nick)
        if problem:
            self.send(self.numeric(ERR_ERRONEUSNICKNAME, nick, text=problem))
        elif nick_key(nick) in self.server.nicks:
            self.send(self.numeric(ERR_NICKNAMEINUSE, nick, text="Nickname is already in use"))
        else:
            self.nick = nick
            self.register()

    def on_user(self, params: list[str]) -> None:
        if self.registered:
            self.send(self.numeric(ERR_ALREADYREGISTERED, text="You may not reregister"))
        elif self.need(params, 4, "USER"):
            self.user = "".join(c for c in params[0] if c.isalnum() or c in "-_.")[:16] or "irc"
            self.realname = clean_text(params[3]).replace("\n", " ")[:MAX_REASON_LEN]
            self.register()

    def offered(self) -> tuple[str, ...]:
        """The capabilities offered: sasl only where there is a password to give."""
        return IRC_CAPS + (("sasl",) if self.server.cfg.password else ())

    def on_authenticate(self, params: list[str]) -> None:
        """SASL PLAIN (IRCv3): the server password as authzid NUL authcid NUL
        password, base64, in 400-byte pieces ("+" ends an exact multiple)."""
        arg = params[0] if params else ""
        if self.registered or "sasl" not in self.caps:
            self.send(self.numeric(ERR_SASLFAIL, text="SASL authentication failed"))
        elif arg == "*":
            self.sasl = None
            self.send(self.numeric(ERR_SASLABORTED, text="SASL authentication aborted"))
        elif self.sasl is None:
            if arg.upper() == "PLAIN":
                self.sasl = ""
                self.send(self.line("AUTHENTICATE +"))
            else:
                self.send(self.numeric(RPL_SASLMECHS, "PLAIN", text="are available SASL "
                                       "mechanisms"),
                          self.numeric(ERR_SASLFAIL, text="SASL authentication failed"))
        else:
            self.sasl += "" if arg == "+" else arg
            if len(arg) == 400 and len(self.sasl) < 4000:
                return  # more pieces follow
            try:
                parts = base64.b64decode(self.sasl, validate=True).decode("utf-8").split("\0")
            except ValueError:
                parts = []
            self.sasl = None
            if len(parts) != 3:
                self.send(self.numeric(ERR_SASLFAIL, text="SASL authentication failed"))
                return
            self.request("AUTHENTICATE", type="auth", password=parts[2])

    def register(self) -> None:
        if not (self.nick and self.user) or self.negotiating or self.registered:
            return
        hello: dict[str, Any] = {"type": "hello", "nick": self.nick, "client": "irc"}
        if self.password is not None:
            hello["password"] = self.password
        self.request(f"NICK {self.nick}", **hello)
        self.registered = self.s.nick is not None

    def on_ping(self, params: list[str]) -> None:
        if not params or not params[0]:
            self.send(self.numeric(ERR_NOORIGIN, text="No origin specified"))
        else:
            self.send(self.line(f":{self.name} PONG {self.name} :{params[0]}"))

    def on_pong(self, params: list[str]) -> None:
        pass  # any line is a sign of life

    def on_quit(self, params: list[str]) -> None:
        reason = params[0] if params else ""
        self.send(self.line(f"ERROR :Closing link: {self.s.peer} (Quit: {reason})"))
        self.request("QUIT", type="quit", reason=reason)

    def on_join(self, params: list[str]) -> None:
        if not self.need(params, 1, "JOIN"):
            return
        if params[0] == "0":
            for i, room in enumerate(list(self.s.rooms.values())):
                if i and not self.extra_token():
                    return
                self.request(f"PART {room.name}", type="part", room=room.name)
            return
        for i, name in enumerate(params[0].split(",")):
            if i and not self.extra_token():
                return
            if name and nick_key(name) not in self.s.rooms:
                self.request(f"JOIN {name}", type="join", room=name)

    def on_part(self, params: list[str]) -> None:
        if not self.need(params, 1, "PART"):
            return
        for i, name in enumerate(params[0].split(",")):
            if i and not self.extra_token():
                return
            fields: dict[str, Any] = {"type": "part", "room": name}
            if len(params) > 1:
                fields["reason"] = params[1]
            self.request(f"PART {name}", **fields)

    def on_privmsg(self, params: list[str], command: str = "PRIVMSG") -> None:
        if not params:
            if command == "PRIVMSG":
                self.send(self.numeric(ERR_NORECIPIENT, text="No recipient given (PRIVMSG)"))
            return
        if len(params) < 2 or not params[1]:
            if command == "PRIVMSG":
                self.send(self.numeric(ERR_NOTEXTTOSEND, text="No text to send"))
            return
        text, action = params[1], False
        if text.startswith("\x01"):
            body = text.strip("\x01")
            if body.upper().startswith("ACTION "):
                text, action = body[7:], True
            else:
                self.ctcp(command, params[0], body)
                return
        for i, target in enumerate(params[0].split(",")[:4]):
            if i and not self.extra_token():
                return
            fields: dict[str, Any] = {"text": self.fit(command, target, text, action)}
            if self.in_tags:
                fields["tags"] = self.in_tags
            if action:
                fields["action"] = True
            if command == "NOTICE":
                fields["notice"] = True
            if target.startswith("#"):
                self.request(f"{command} {target}", type="msg", room=target, **fields)
            else:
                self.request(f"{command} {target}", type="pm", to=target, **fields)

    def fit(self, command: str, target: str, text: str, action: bool) -> str:
        """An IRC user's message, cut to what fits in ONE line as the other
        IRC users will see it (with this user's full prefix): a line that
        came as one line is relayed as one line."""
        shown = self.server.rooms.get(nick_key(target)) if target.startswith("#") else \
            self.server.nicks.get(nick_key(target))
        name = (shown.name if isinstance(shown, Room) else shown.nick) if shown else target
        head = f":{self.prefix(self.me())} {command} {name} :"
        budget = IRC_MAX_LINE - 2 - len(head.encode("utf-8")) - (9 if action else 0)
        data = text.encode("utf-8")
        if len(data) <= budget:
            return text
        return data[:max(budget, 0)].decode("utf-8", "ignore")

    def ctcp(self, command: str, target: str, body: str) -> None:
        """A CTCP query or reply (not ACTION): relayed unchanged to an IRC
        user, answered by the gateway for a PyChat user (VERSION, PING,
        TIME); DCC is refused, since files go through the server here."""
        word, _, rest = body.partition(" ")
        other = self.server.nicks.get(nick_key(target))
        if word.upper() == "DCC":
            if command == "PRIVMSG":
                self.send(self.line(f":{self.name} NOTICE {self.me()} :DCC is not supported "
                                    "here; PyChat sends files through the server"))
            return
        if other is not None and (irc_of(other) is not None or other.remote):
            fields: dict[str, Any] = {"text": clean_text(body)[:self.server.cfg.max_text],
                                      "ctcp": True}
            if command == "NOTICE":
                fields["notice"] = True
            self.request(f"{command} {target}", type="pm", to=target, **fields)
            return
        if command != "PRIVMSG" or other is None:
            return
        answer = {"VERSION": f"VERSION PyChat {__version__} (via the IRC gateway)",
                  "PING": f"PING {rest}",
                  "TIME": "TIME " + time.strftime("%a %b %d %H:%M:%S %Y")}.get(word.upper())
        if answer:
            self.send(self.line(f":{self.prefix(other.nick)} NOTICE {self.me()} "
                                f":\x01{answer}\x01"))

    def on_notice(self, params: list[str]) -> None:
        self.on_privmsg(params, "NOTICE")

    def _room(self, name: str) -> Room | None:
        room = self.server.rooms.get(nick_key(name))
        if room is None:
            self.send(self.numeric(ERR_NOSUCHCHANNEL, name, text="No such channel"))
        return room

    def on_names(self, params: list[str]) -> None:
        if not params:
            self.send(self.numeric(RPL_ENDOFNAMES, "*", text="End of /NAMES list."))
            return
        for name in params[0].split(","):
            room = self.server.rooms.get(nick_key(name))
            inside = room is not None and nick_key(room.name) in self.s.rooms
            self.send(*(self.names(room) if inside else  # everyone is +i: members only
                        [self.numeric(RPL_ENDOFNAMES, name, text="End of /NAMES list.")]))

    def on_topic(self, params: list[str]) -> None:
        if not self.need(params, 1, "TOPIC"):
            return
        if len(params) > 1:
            self.request(f"TOPIC {params[0]}", type="topic", room=params[0], topic=params[1])
            return
        room = self._room(params[0])
        if room is None:
            return
        if nick_key(room.name) not in self.s.rooms:
            self.send(self.numeric(ERR_NOTONCHANNEL, room.name, text="You're not on that channel"))
        elif room.topic:
            self.send(*self.topic_lines(room))
        else:
            self.send(self.numeric(RPL_NOTOPIC, room.name, text="No topic is set"))

    def on_list(self, params: list[str]) -> None:
        wanted = {nick_key(n) for n in params[0].split(",")} if params else None
        self.send(self.numeric(RPL_LISTSTART, "Channel", text="Users  Name"))
        for key, room in sorted(self.server.rooms.items()):
            if wanted is None or key in wanted:
                self.send(self.numeric(RPL_LIST, room.name, str(len(room.members)),
                                       text=room.topic))
        self.send(self.numeric(RPL_LISTEND, text="End of /LIST"))

    def _who_line(self, target: str, s: Session, room: Room | None = None) -> bytes:
        flags = ("G" if s.away is not None else "H") + ("*" if s.operator else "") + \
            ("@" if room is not None and is_room_op(room, s) else "")
        user, host, real = irc_identity(s, self.name)
        server = s.via if s.remote else self.name  # type: ignore[attr-defined]
        return self.numeric(RPL_WHOREPLY, target, user, host, server, str(s.nick), flags,
                            text=f"{1 if s.remote else 0} {real}")

    def on_who(self, params: list[str]) -> None:
        """WHO #chan, WHO nick, WHO mask (* and ?, on nick!user@host and the
        real name).  Everyone is +i, so only those who share a channel with
        the asker (and the asker) are shown, as RFC 2812 says."""
        mask = params[0] if params else "*"
        me = self.s
        seen = {m for room in me.rooms.values() for m in room.members.values()} | {me}
        if mask.startswith("#"):
            room = self.server.rooms.get(nick_key(mask))
            inside = room is not None and nick_key(room.name) in me.rooms
            for s in (room.members.values() if room else []):
                if inside or s is me:
                    self.send(self._who_line(room.name, s, room))
        else:
            pattern = mask if mask != "0" else "*"
            for s in sorted(seen, key=lambda x: nick_key(x.nick or "")):
                real = irc_identity(s, self.name)[2]
                if s.nick is not None and any(irc_match(pattern, text) for text in
                                              (s.nick, self.prefix(s.nick), real)):
                    self.send(self._who_line("*", s))
        self.send(self.numeric(RPL_ENDOFWHO, mask, text="End of /WHO list."))

    def on_whois(self, params: list[str]) -> None:
        if not self.need(params, 1, "WHOIS"):
            return
        nick = params[-1]
        s = self.server.nicks.get(nick_key(nick))
        if s is None:
            self.send(self.numeric(ERR_NOSUCHNICK, nick, text="No such nick/channel"))
        else:
            nick = str(s.nick)
            user, host, real = irc_identity(s, self.name)
            self.send(self.numeric(RPL_WHOISUSER, nick, user, host, "*", text=real))
            rooms = " ".join(("@" if is_room_op(r, s) else "") + r.name
                             for r in s.rooms.values())
            if rooms:
                self.send(self.numeric(RPL_WHOISCHANNELS, nick, text=rooms))
            self.send(self.numeric(RPL_WHOISSERVER, nick, s.via if s.remote  # type: ignore
                                   else self.name, text="PyChat" if not s.remote else
                                   "another server of the network"))
            if s.away is not None:
                self.send(self.numeric(RPL_AWAY, nick, text=s.away or "away"))
            if s.operator:
                self.send(self.numeric(RPL_WHOISOPERATOR, nick, text="is an operator"))
        self.send(self.numeric(RPL_ENDOFWHOIS, nick, text="End of /WHOIS list."))

    def on_away(self, params: list[str]) -> None:
        if params and params[0]:
            self.request("AWAY", type="away", message=params[0])
        else:
            self.request("AWAY", type="back")

    def on_mode(self, params: list[str]) -> None:
        if not self.need(params, 1, "MODE"):
            return
        target = params[0]
        if target.startswith("#"):
            room = self._room(target)
            if room is None:
                return
            if len(params) == 1:
                self.send(self.numeric(RPL_CHANNELMODEIS, room.name, "+n"))
            elif params[1].lstrip("+") in ("b", "e", "I"):
                end = {"b": RPL_ENDOFBANLIST, "e": RPL_ENDOFEXCEPTLIST,
                       "I": RPL_ENDOFINVITELIST}[params[1].lstrip("+")]
                self.send(self.numeric(end, room.name, text="End of list"))
            elif params[1].lstrip("+-") and set(params[1].lstrip("+-")) <= set("o+-"):
                self.modes(room, params[1], params[2:])
            else:
                self.send(self.numeric(ERR_CHANOPRIVSNEEDED, room.name,
                                       text="Only +o/-o can change on PyChat"))
        elif nick_key(target) == nick_key(self.me()):
            if len(params) == 1:
                self.send(self.numeric(RPL_UMODEIS, "+i"))
            else:  # user modes are fixed: say what they are
                self.send(self.line(f":{self.prefix(self.me())} MODE {self.me()} :+i"))
        else:
            self.send(self.numeric(ERR_USERSDONTMATCH, text="Can't change mode for other users"))

    def modes(self, room: Room, change: str, nicks: list[str]) -> None:
        """MODE #chan +o nick, -o nick, +oo-o a b c: operators of the room."""
        give, done = True, 0
        for letter in change:
            if letter in "+-":
                give = letter == "+"
                continue
            if done == IRC_MODES or (done and not self.extra_token()):
                return  # MODES=4; each change after the first pays a flood token
            done += 1
            if not nicks:
                self.send(self.numeric(ERR_NEEDMOREPARAMS, "MODE", text="Not enough parameters"))
                return
            nick = nicks.pop(0)
            self.request(f"MODE {room.name} {nick}", type="mode", room=room.name, nick=nick,
                         op=give)

    def on_tagmsg(self, params: list[str]) -> None:
        """Tags without text (message-tags): +typing becomes PyChat's typing
        notice; other client tags are relayed to those who asked for them."""
        if not self.need(params, 1, "TAGMSG") or not self.in_tags:
            return
        target = params[0].split(",")[0]
        typing = self.in_tags.pop("+typing", None)
        if typing == "active" and target.startswith("#"):
            self.request(f"TAGMSG {target}", type="typing", room=target)
        if self.in_tags:
            where = {"room": target} if target.startswith("#") else {"to": target}
            self.request(f"TAGMSG {target}", type="tagmsg", tags=self.in_tags, **where)

    def on_kick(self, params: list[str]) -> None:
        if not self.need(params, 2, "KICK"):
            return
        fields: dict[str, Any] = {"type": "kick", "room": params[0], "nick": params[1]}
        if len(params) > 2:
            fields["reason"] = params[2]
        self.request(f"KICK {params[0]} {params[1]}", **fields)

    def on_motd(self, params: list[str]) -> None:
        self.send(*self.motd())

    def on_version(self, params: list[str]) -> None:
        self.send(self.numeric(RPL_VERSION, f"PyChat-{__version__}.", self.name,
                               text="PyChat's IRC gateway"))

    def on_lusers(self, params: list[str]) -> None:
        users = len(self.server.nicks)
        self.send(self.numeric(RPL_LUSERCLIENT, text=f"There are {users} users and 0 invisible on 1 "
                                           "server"),
                  self.numeric(RPL_LUSERCHANNELS, str(len(self.server.rooms)), text="channels formed"),
                  self.numeric(RPL_LUSERME, text=f"I have {users} clients and 0 servers"))

    def on_ison(self, params: list[str]) -> None:
        online = [str(self.server.nicks[nick_key(n)].nick) for n in " ".join(params).split()
                  if nick_key(n) in self.server.nicks]
        self.send(self.numeric(RPL_ISON, text=" ".join(online)))

    def on_userhost(self, params: list[str]) -> None:
        found = []
        for n in params[:5]:
            other = self.server.nicks.get(nick_key(n))
            if other is not None:  # nick=+user@host, "-" when away
                user, host, _ = irc_identity(other, self.name)
                found.append(f"{other.nick}={'-' if other.away is not None else '+'}"
                             f"{user}@{host}")
        self.send(self.numeric(RPL_USERHOST, text=" ".join(found)))


# IRC commands and their handlers (a table: what is not in it gets 421).
IRC_COMMANDS: dict[str, Callable[[IrcWire, list[str]], None]] = {
    "CAP": IrcWire.on_cap, "PASS": IrcWire.on_pass, "NICK": IrcWire.on_nick,
    "USER": IrcWire.on_user, "PING": IrcWire.on_ping, "PONG": IrcWire.on_pong,
    "QUIT": IrcWire.on_quit, "JOIN": IrcWire.on_join, "PART": IrcWire.on_part,
    "PRIVMSG": IrcWire.on_privmsg, "NOTICE": IrcWire.on_notice, "NAMES": IrcWire.on_names,
    "TOPIC": IrcWire.on_topic, "LIST": IrcWire.on_list, "WHO": IrcWire.on_who,
    "WHOIS": IrcWire.on_whois, "AWAY": IrcWire.on_away, "MODE": IrcWire.on_mode,
    "MOTD": IrcWire.on_motd, "VERSION": IrcWire.on_version, "LUSERS": IrcWire.on_lusers,
    "ISON": IrcWire.on_ison, "USERHOST": IrcWire.on_userhost, "KICK": IrcWire.on_kick,
    "AUTHENTICATE": IrcWire.on_authenticate, "TAGMSG": IrcWire.on_tagmsg,
    "CHATHISTORY": IrcWire.on_chathistory,
}
IRC_BEFORE_REGISTRATION = frozenset({"CAP", "PASS", "NICK", "USER", "PING", "PONG", "QUIT",
                                     "AUTHENTICATE"})
ChatServer.foreign_wire = IrcWire  # a first line that is not JSON is IRC


# ===========================================================================
# 3c. Web gateway -- HttpWire and WebWire: "open http://ADDR:5050 on your
#     phone" is the whole instruction.  Uses: constants, protocol, server.
#
# A first line that starts with an HTTP method makes the connection HTTP
# (HttpWire, or every connection on --web-port).  The head is read with
# every limit named below; one response is sent and the connection closed,
# except for GET /ws, which becomes a WebSocket (RFC 6455) whose text
# messages carry exactly protocol v1's JSON, one event per message
# (WebWire).  From then on it is an ordinary member: the same handlers,
# flood bucket, backlog cap, bans and mutes, and a broadcast is framed once
# for every WebSocket member.  The page's files are data (WEB_FILES); the
# sound and launcher sections add the ding and the icon to it, so this
# section names neither.
#
# Security: a strict Content-Security-Policy (scripts and styles only from
# this server's own files, no inline code, no eval) and nosniff on every
# response; a WebSocket is only opened for a page from this same server (its
# Origin must be the Host it asked for, or a --web-origin), and only for a
# Host that is an IP address, localhost or this machine's name (a page from
# elsewhere that re-points its own name at this address, DNS rebinding, gets
# 403).  Request smuggling shapes get 400 and the connection is closed.
# ===========================================================================

WEB_MAX_HEAD = 8 * 1024        # request line and headers together, in bytes
WEB_MAX_HEADERS = 50           # header lines in one request
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS",
                b"TRACE", b"PATCH")

# WebSocket opcodes and close codes (RFC 6455 5.2 and 7.4.1).
WS_CONTINUATION, WS_TEXT, WS_BINARY = 0x0, 0x1, 0x2
WS_CLOSE, WS_PING, WS_PONG = 0x8, 0x9, 0xA
WS_NORMAL = 1000
WS_GOING_AWAY = 1001
WS_PROTOCOL_ERROR = 1002
WS_UNSUPPORTED = 1003          # a binary message: protocol v1 is text
WS_BAD_DATA = 1007             # a text message that is not UTF-8
WS_POLICY = 1008               # refused, flooding, kicked, banned, timed out
WS_TOO_BIG = 1009              # a message longer than --max-line-bytes
WS_SERVER_ERROR = 1011
# Close codes a peer may send (RFC 6455 7.4.1-2); others are a protocol error.
WS_PEER_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                           1013, 1014, *range(3000, 5000)})
# The core's reasons for closing a member -> the close code a browser sees.
WS_CLOSE_CODES = {"quit": WS_NORMAL, "disconnected": WS_NORMAL, "shutdown": WS_GOING_AWAY,
                  "error": WS_SERVER_ERROR, "line_too_long": WS_TOO_BIG}

# --- the page: one constant per file, served as /, /app.css and /app.js so
# that the Content-Security-Policy can forbid every inline script and style.
# WEB_JS is the browser's client, what ChatClient and the window are for
# Python: the connect form (and the password, on auth_failed), rooms and
# private conversations, history, files through the relay, and reconnecting
# with backoff and the resume token, the unconfirmed messages re-sent once
# by cid.  It connects with
#   new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws")
# and speaks protocol v1 over it: one JSON event per text message.  Text from
# the network is only ever set with textContent.  Its "/*COMMANDS*/null" is
# the COMMANDS table's "web" rows when served (web_js, in section 4, adds
# itself to WEB_FILES like the ding and the icon), so /help is one table for
# every UI.  Raw strings: the backslashes belong to CSS and JavaScript.  The
# tests lint WEB_JS (node --check, ESLint) and drive the page in Chromium.
WEB_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="color-scheme" content="dark light">
<meta name="referrer" content="no-referrer">
<title>PyChat</title>
<link rel="icon" href="/icon.png">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<main id="login" class="login">
  <form id="login-form" class="card" aria-labelledby="login-title">
    <h1 id="login-title">PyChat</h1>
    <p id="login-server" class="dim"></p>
    <label for="login-nick">Your nick</label>
    <input id="login-nick" name="nick" autocomplete="nickname" autocapitalize="off" spellcheck="false" maxlength="32" required>
    <div id="login-password-row" hidden>
      <label for="login-password">Server password</label>
      <input id="login-password" name="password" type="password" autocomplete="current-password">
    </div>
    <p id="login-error" class="error" role="alert"></p>
    <button id="login-join" type="submit" class="primary">Join the chat</button>
  </form>
</main>
<div id="chat" class="chat" hidden>
  <header class="top">
    <button id="menu" type="button" class="icon" aria-label="Conversations and people" aria-controls="drawer" aria-expanded="false">&#9776;</button>
    <div class="title">
      <h1 id="conv-title">PyChat</h1>
      <p id="conv-topic" class="topic"></p>
    </div>
    <p id="status" class="status" role="status"></p>
    <button id="sound" type="button" class="icon" aria-pressed="true" aria-label="Sound on" title="Sound on">&#128276;</button>
  </header>
  <div id="backdrop" class="backdrop"></div>
  <nav id="drawer" class="drawer" aria-label="Conversations and people">
    <h2>Conversations</h2>
    <ul id="convs" class="convs"></ul>
    <h2 id="people-title">People</h2>
    <ul id="people" class="people"></ul>
  </nav>
  <main id="main" class="main">
    <p id="banner" class="banner" role="alert" hidden></p>
    <div id="log" class="log"></div>
    <p id="typing" class="typing"></p>
    <ul id="pending" class="pending" aria-label="Not delivered yet"></ul>
  </main>
  <form id="composer" class="composer" aria-label="Write a message">
    <button id="attach" type="button" class="icon" aria-label="Send a file" title="Send a file">&#128206;</button>
    <input id="file" type="file" multiple hidden>
    <label for="input" class="sr-only">Message</label>
    <textarea id="input" rows="1" placeholder="Message" autocomplete="off" enterkeyhint="send"></textarea>
    <button id="emoji" type="button" class="icon" aria-label="Emoji" aria-expanded="false" aria-controls="emoji-panel" title="Emoji">&#128578;</button>
    <button id="send" type="submit" class="primary send" aria-label="Send">&#10148;</button>
    <div id="emoji-panel" class="emoji-panel" role="dialog" aria-label="Emoji" hidden>
      <label for="emoji-search" class="sr-only">Search emoji</label>
      <input id="emoji-search" type="search" placeholder="Search emoji" autocomplete="off">
      <div id="emoji-tabs" class="emoji-tabs" role="tablist"></div>
      <div id="emoji-grid" class="emoji-grid"></div>
    </div>
  </form>
  <div id="live" class="sr-only" aria-live="polite"></div>
</div>
<div id="drop" class="drop" hidden><p>Drop files to send them here</p></div>
</body>
</html>
"""
WEB_CSS = r"""/* PyChat in the browser: phones first (360 px up), dark and light. */
:root {
  --bg: #313338; --side: #2b2d31; --header: #1e1f22; --input: #383a40;
  --text: #dbdee1; --dim: #949ba4; --accent: #5865f2; --accent-text: #fff;
  --button: #4e5058; --mention: #4a4537; --mention-bar: #f0b232; --link: #00a8fc;
  --error: #f23f43; --ok: #23a55a; --marker: #f23f43; --line: #3f4147;
  color-scheme: dark;
}
@media (prefers-color-scheme: light) {
  :root {
    --bg: #ffffff; --side: #f2f3f5; --header: #e3e5e8; --input: #ebedef;
    --text: #1f2124; --dim: #5c5e66; --accent: #4752c4; --accent-text: #fff;
    --button: #d4d7dc; --mention: #fbf1d8; --mention-bar: #c58b00; --link: #005fa3;
    --error: #c5221f; --ok: #1a7f43; --marker: #d92f2f; --line: #dcdee2;
    color-scheme: light;
  }
}
/* Emoji in colour wherever the system has a colour emoji font, without its
   digits and # (which those fonts also draw) replacing the text's. */
@font-face {
  font-family: "PyChat Emoji";
  src: local("Apple Color Emoji"), local("Segoe UI Emoji"), local("Noto Color Emoji");
  unicode-range: U+203C, U+2049, U+2122, U+2139, U+2194-21AA, U+231A-23FF, U+24C2, U+25AA-25FE,
                 U+2600-27BF, U+2934-2935, U+2B05-2B55, U+3030, U+303D, U+3297, U+3299, U+FE0F,
                 U+1F000-1FAFF;
}
* { box-sizing: border-box; }
html, body { height: 100%; margin: 0; }
body {
  background: var(--bg); color: var(--text);
  font: 16px/1.45 "PyChat Emoji", system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans",
        sans-serif, "Apple Color Emoji", "Segoe UI Emoji", "Noto Color Emoji";
  -webkit-text-size-adjust: 100%;
}
[hidden] { display: none !important; }
.sr-only {
  position: absolute; width: 1px; height: 1px; padding: 0; margin: -1px;
  overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; border: 0;
}
.dim { color: var(--dim); }
.error { color: var(--error); min-height: 1.2em; margin: .5rem 0; }
a { color: var(--link); }
button, input, textarea { font: inherit; color: inherit; }
code { font-family: "PyChat Emoji", ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
button {
  min-height: 44px; min-width: 44px; border: 0; border-radius: 8px; cursor: pointer;
  background: var(--button); padding: 0 14px;
}
button:focus-visible, input:focus-visible, textarea:focus-visible, a:focus-visible {
  outline: 2px solid var(--accent); outline-offset: 2px;
}
button.primary { background: var(--accent); color: var(--accent-text); font-weight: 600; }
button.icon { background: transparent; font-size: 1.3rem; padding: 0 8px; }
button.icon:hover { background: var(--button); }

/* --- connect form */
.login { min-height: 100%; display: grid; place-items: center; padding: 16px; }
.card {
  width: 100%; max-width: 380px; background: var(--side); border-radius: 12px; padding: 24px;
  display: flex; flex-direction: column;
}
.card h1 { margin: 0 0 4px; font-size: 1.6rem; }
.card label { margin-top: 12px; font-weight: 600; font-size: .9rem; }
.card input {
  margin-top: 4px; min-height: 44px; padding: 8px 12px; border-radius: 8px;
  border: 1px solid var(--line); background: var(--input);
}
.card .primary { margin-top: 8px; }

/* --- the chat: header, drawer, messages, composer */
.chat {
  height: 100vh; height: 100dvh; display: grid;
  grid-template: "top top" auto "drawer main" 1fr "drawer composer" auto / 260px minmax(0, 1fr);
}
.top {
  grid-area: top; display: flex; align-items: center; gap: 8px; padding: 4px 8px;
  background: var(--header); min-height: 52px; padding-top: max(4px, env(safe-area-inset-top));
}
.top .title { flex: 1; min-width: 0; }
.top h1 { font-size: 1.05rem; margin: 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.topic { margin: 0; font-size: .85rem; color: var(--dim); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.status { margin: 0; font-size: .8rem; color: var(--dim); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; min-width: 0; }
.status.down { color: var(--error); }
#menu { display: none; }
.drawer { grid-area: drawer; background: var(--side); overflow-y: auto; padding: 8px; }
.drawer h2 { font-size: .75rem; text-transform: uppercase; letter-spacing: .05em; color: var(--dim); margin: 12px 8px 4px; }
.drawer ul { list-style: none; margin: 0; padding: 0; }
.drawer li button {
  width: 100%; text-align: left; background: transparent; display: flex; align-items: center;
  gap: 6px; padding: 0 10px; border-radius: 6px; color: var(--dim);
}
.drawer li button:hover { background: var(--input); color: var(--text); }
.drawer li button[aria-current="true"] { background: var(--input); color: var(--text); font-weight: 600; }
.drawer .name { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.drawer .unread { color: var(--text); font-weight: 700; }
.badge {
  background: var(--error); color: #fff; border-radius: 10px; font-size: .75rem; font-weight: 700;
  padding: 0 7px; min-width: 20px; text-align: center;
}
.people .away, .convs .gone { opacity: .55; }
.people .note { font-size: .8rem; color: var(--dim); }
.main { grid-area: main; display: flex; flex-direction: column; min-height: 0; min-width: 0; }
.banner { margin: 0; padding: 8px 12px; background: var(--error); color: #fff; font-weight: 600; }
.log { flex: 1; overflow-y: auto; padding: 8px 0; overscroll-behavior: contain; }
.pane { display: flex; flex-direction: column; }
.msg { padding: 2px 16px; overflow-wrap: anywhere; }
.msg:hover { background: rgba(127, 127, 127, .08); }
.msg .head { display: flex; gap: 8px; align-items: baseline; margin-top: 8px; }
.msg .nick { font-weight: 700; }
.msg .time { font-size: .75rem; color: var(--dim); }
.msg .text { white-space: pre-wrap; }
.msg.action .text { font-style: italic; }
.msg.mention { background: var(--mention); box-shadow: inset 3px 0 var(--mention-bar); }
.msg.system { color: var(--dim); font-size: .9rem; }
.msg.system .time { margin-right: 8px; }
.msg.error { color: var(--error); margin: 0; }
.marker {
  display: flex; align-items: center; gap: 8px; color: var(--marker); font-size: .75rem;
  font-weight: 700; text-transform: uppercase; margin: 6px 16px;
}
.marker::before, .marker::after { content: ""; flex: 1; border-top: 1px solid var(--marker); }
.help { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 4px 0; }
.help code { color: var(--text); }
.typing { margin: 0; padding: 0 16px; min-height: 1.4em; font-size: .85rem; color: var(--dim); font-style: italic; }
.pending { list-style: none; margin: 0; padding: 0 16px; color: var(--dim); font-size: .9rem; }
.pending li::after { content: " \2014 not delivered yet"; font-style: italic; }
.n0 { color: #f47b67; } .n1 { color: #57f287; } .n2 { color: #fee75c; } .n3 { color: #5dadec; }
.n4 { color: #eb459e; } .n5 { color: #3ddbd9; } .n6 { color: #ff9f43; } .n7 { color: #a78bfa; }
.n8 { color: #7ee787; } .n9 { color: #f9a8d4; } .n10 { color: #93c5fd; } .n11 { color: #fbbf24; }
@media (prefers-color-scheme: light) {
  .n0 { color: #c0392b; } .n1 { color: #1e8449; } .n2 { color: #9a7d0a; } .n3 { color: #1f618d; }
  .n4 { color: #a0307a; } .n5 { color: #117a78; } .n6 { color: #b9560b; } .n7 { color: #6c3fc5; }
  .n8 { color: #2d7d32; } .n9 { color: #b4306d; } .n10 { color: #2856a3; } .n11 { color: #8a6100; }
}

/* --- files */
.file {
  margin: 6px 16px; padding: 10px 12px; background: var(--side); border-radius: 8px;
  max-width: 480px; border: 1px solid var(--line);
}
.file .fname { font-weight: 600; overflow-wrap: anywhere; }
.file .fstate { font-size: .85rem; color: var(--dim); margin: 2px 0 6px; }
.file progress { width: 100%; height: 8px; accent-color: var(--ok); }
.file .actions { display: flex; flex-wrap: wrap; gap: 8px; margin-top: 6px; }
.file .actions a { display: inline-flex; align-items: center; min-height: 44px; padding: 0 14px;
  border-radius: 8px; background: var(--ok); color: #fff; text-decoration: none; font-weight: 600; }
.file img { display: block; max-width: 100%; max-height: 240px; margin-top: 8px; border-radius: 6px; }
.file.ok .fstate { color: var(--ok); }
.file.bad .fstate { color: var(--error); }

/* --- composer and emoji picker */
.composer {
  grid-area: composer; position: relative; display: flex; align-items: flex-end; gap: 4px;
  padding: 8px; padding-bottom: max(8px, env(safe-area-inset-bottom)); background: var(--bg);
  border-top: 1px solid var(--line);
}
.composer textarea {
  flex: 1; min-width: 0; min-height: 44px; max-height: 40vh; resize: none; padding: 10px 12px;
  border: 0; border-radius: 8px; background: var(--input); line-height: 1.4;
}
.send { padding: 0 12px; }
.emoji-panel {
  position: absolute; bottom: 100%; right: 8px; width: min(360px, calc(100vw - 16px));
  background: var(--side); border: 1px solid var(--line); border-radius: 10px; padding: 8px;
  box-shadow: 0 8px 24px rgba(0, 0, 0, .35); z-index: 20;
}
.emoji-panel input { width: 100%; min-height: 44px; padding: 6px 10px; border-radius: 6px;
  border: 1px solid var(--line); background: var(--input); }
.emoji-tabs { display: flex; overflow-x: auto; gap: 2px; margin: 6px 0; }
.emoji-tabs button { min-width: 44px; min-height: 44px; padding: 0; background: transparent; font-size: 1.2rem; }
.emoji-tabs button[aria-selected="true"] { background: var(--input); }
.emoji-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(44px, 1fr)); max-height: 220px; overflow-y: auto; }
.emoji-grid button { background: transparent; font-size: 1.5rem; padding: 0; }
.emoji-grid button:hover, .emoji-grid button:focus-visible { background: var(--input); }
.emoji-grid p { grid-column: 1 / -1; color: var(--dim); margin: 8px; }
.drop {
  position: fixed; inset: 0; background: rgba(88, 101, 242, .35); display: grid; place-items: center;
  z-index: 50; pointer-events: none; font-size: 1.4rem; font-weight: 700; color: #fff;
}
.backdrop { display: none; }

/* --- phones: the sidebar becomes a drawer */
@media (max-width: 720px) {
  .chat { grid-template: "top" auto "main" 1fr "composer" auto / minmax(0, 1fr); }
  #menu { display: inline-block; }
  .status { display: none; }
  .status.down { display: block; }
  .drawer {
    position: fixed; top: 0; bottom: 0; left: 0; width: min(300px, 85vw); z-index: 30;
    transform: translateX(-105%); transition: transform .2s ease; padding-top: max(8px, env(safe-area-inset-top));
  }
  body.drawer-open .drawer { transform: none; box-shadow: 0 0 24px rgba(0, 0, 0, .5); }
  body.drawer-open .backdrop { display: block; position: fixed; inset: 0; background: rgba(0, 0, 0, .45); z-index: 25; }
  .msg { padding: 2px 10px; }
  .help { grid-template-columns: 1fr; gap: 0; }
  .help span { margin-bottom: 6px; padding-left: 12px; }
}
@media (prefers-reduced-motion: reduce) { .drawer { transition: none; } }
"""
WEB_JS = r"""// PyChat in the browser: one more JSON session over a WebSocket (protocol v1,
// one event per text frame).  Text reaches the page only through textContent
// and createTextNode (never as markup); no inline handler, nothing evaluated.
(function () {
  "use strict";

  // The server fills this in from pychat.py's COMMANDS table (the "web" UI):
  // {"commands": [{"name", "aliases", "args", "help"}...], "footer": [[keys, help]...]}.
  const TABLE = /*COMMANDS*/null || { commands: [], footer: [] };

  const VERSION = "web/1";
  const LOBBY = "#lobby";
  const TYPING_EVERY = 3000;       // say "typing" at most this often (ms)
  const TYPING_SHOWN_FOR = 6000;   // a "typing" notice stays this long without news
  const BACKOFF_START = 500;       // first reconnect delay, doubled up to BACKOFF_MAX
  const BACKOFF_MAX = 30000;
  const KEEPALIVE = 25000;         // ping a silent server after this long...
  const DEAD_AFTER = 60000;        // ...and reconnect when it stays silent
  const PROBE_WAIT = 5000;         // back from the background: a silent link this long is dead
  const SHOW_PENDING_AFTER = 700;  // an unconfirmed message is listed after this long
  const FILE_CHUNK = 32 * 1024;    // bytes per file_chunk, as the server expects
  const FILE_WINDOW = 16;          // chunks in flight per receiver
  const MAX_LINES = 2000;          // a conversation forgets its oldest lines past this
  const GROUP_WITHIN = 300;        // seconds: one sender's messages in a row share a nick
  const MAX_SEEN = 20000;          // message ids remembered to drop duplicates
  const URL_RE = /\b(?:https?:\/\/|www\.)[^\s<>"']+[^\s<>"'.,;:!?)\]}]/gi;
  const EMOJI = [["Smileys", "😀 grinning face|😃 smiling face with open mouth|😄 smiling face with open mouth and smiling eyes|😁 grinning face with smiling eyes|😆 smiling face with open mouth and tightly-closed eyes|😅 smiling face with open mouth and cold sweat|🤣 rolling on the floor laughing rofl lol|😂 face with tears of joy lol|🙂 slightly smiling face|🙃 upside-down face|😉 winking face|😊 smiling face with smiling eyes smile happy|😇 smiling face with halo|🥰 smiling face with smiling eyes and three hearts|😍 smiling face with heart-shaped eyes|🤩 grinning face with star eyes|😘 face throwing a kiss|😗 kissing face|😚 kissing face with closed eyes|😋 face savouring delicious food|😛 face with stuck-out tongue|😜 face with stuck-out tongue and winking eye|🤪 grinning face with one large and one small eye|😝 face with stuck-out tongue and tightly-closed eyes|🤑 money-mouth face|🤗 hugging face|🤭 smiling face with smiling eyes and hand covering mouth|🤫 face with finger covering closed lips|🤔 thinking face think hmm|🤐 zipper-mouth face|🤨 face with one eyebrow raised|😐 neutral face|😑 expressionless face|😶 face without mouth|😏 smirking face|😒 unamused face|🙄 face with rolling eyes|😬 grimacing face|😌 relieved face|😔 pensive face|😪 sleepy face|🤤 drooling face|😴 sleeping face|😷 face with medical mask|🤒 face with thermometer|🤕 face with head-bandage|🤢 nauseated face|🤮 face with open mouth vomiting|🤧 sneezing face|🥵 overheated face|🥶 freezing face|🥴 face with uneven eyes and wavy mouth|😵 dizzy face|🤯 shocked face with exploding head|🤠 face with cowboy hat|🥳 face with party horn and party hat party birthday|😎 smiling face with sunglasses cool sunglasses|🤓 nerd face|🧐 face with monocle|😕 confused face|😟 worried face|🙁 slightly frowning face|😮 face with open mouth|😯 hushed face|😲 astonished face|😳 flushed face|🥺 face with pleading eyes|😦 frowning face with open mouth|😧 anguished face|😨 fearful face|😰 face with open mouth and cold sweat|😥 disappointed but relieved face|😢 crying face sad cry|😭 loudly crying face sad cry|😱 face screaming in fear|😖 confounded face|😣 persevering face|😞 disappointed face|😓 face with cold sweat|😩 weary face|😫 tired face|🥱 yawning face|😤 face with look of triumph|😡 pouting face|😠 angry face|🤬 serious face with symbols covering mouth|😈 smiling face with horns|💀 skull|💩 pile of poo|🤡 clown face|👻 ghost|👽 extraterrestrial alien|🤖 robot face|😺 smiling cat face with open mouth|😸 grinning cat face with smiling eyes|😹 cat face with tears of joy|😻 smiling cat face with heart-shaped eyes|🙈 see-no-evil monkey oops|🙉 hear-no-evil monkey|🙊 speak-no-evil monkey"], ["People", "👋 waving hand sign hello hi bye wave|🤚 raised back of hand|✋ raised hand|🖖 raised hand with part between middle and ring fingers|👌 ok hand sign|🤏 pinching hand|✌️ victory hand|🤞 hand with index and middle fingers crossed|🤟 i love you hand sign|🤘 sign of the horns|🤙 call me hand|👈 white left pointing backhand index|👉 white right pointing backhand index|👆 white up pointing backhand index|👇 white down pointing backhand index|☝️ white up pointing index|👍 thumbs up sign thumbs up yes ok|👎 thumbs down sign thumbs down no|✊ raised fist|👊 fisted hand sign|👏 clapping hands sign|🙌 person raising both hands in celebration|👐 open hands sign|🤲 palms up together|🤝 handshake|🙏 person with folded hands please thanks|✍️ writing hand|💪 flexed biceps|🧠 brain|👀 eyes|👁️ eye|👶 baby|🧒 child|👦 boy|👧 girl|🧑 adult|👨 man|👩 woman|🧓 older adult|👴 older man|👵 older woman|🙋 happy person raising one hand|🤷 shrug|🤦 face palm|🙇 person bowing deeply|💃 dancer|🕺 man dancing|🏃 runner|🚶 pedestrian"], ["Hearts", "❤️ heavy black heart heart love|🧡 orange heart|💛 yellow heart|💚 green heart|💙 blue heart|💜 purple heart|🤎 brown heart|🖤 black heart|🤍 white heart|💔 broken heart|💕 two hearts|💞 revolving hearts|💓 beating heart|💗 growing heart|💖 sparkling heart|💘 heart with arrow|💝 heart with ribbon|💯 hundred points symbol hundred|💢 anger symbol|💥 collision symbol|💫 dizzy symbol|💦 splashing sweat symbol|💨 dash symbol|💬 speech balloon|💭 thought balloon|💤 sleeping symbol"], ["Nature", "🐶 dog face|🐱 cat face|🐭 mouse face|🐹 hamster face|🐰 rabbit face|🦊 fox face|🐻 bear face|🐼 panda face|🐨 koala|🐯 tiger face|🦁 lion face|🐮 cow face|🐷 pig face|🐸 frog face|🐵 monkey face|🐔 chicken|🐧 penguin|🐦 bird|🦆 duck|🦉 owl|🐺 wolf face|🐴 horse face|🦄 unicorn face|🐝 honeybee|🐛 bug bug|🦋 butterfly|🐌 snail|🐞 lady beetle|🐢 turtle|🐍 snake|🐙 octopus|🦀 crab|🐟 fish|🐬 dolphin|🐳 spouting whale|🌵 cactus|🎄 christmas tree|🌲 evergreen tree|🌳 deciduous tree|🌴 palm tree|🌱 seedling|🌿 herb|🍀 four leaf clover|🍁 maple leaf|🍂 fallen leaf|🌷 tulip|🌹 rose|🌻 sunflower|🌼 blossom|🌸 cherry blossom|🌞 sun with face|🌝 full moon with face|🌛 first quarter moon with face|⭐ white medium star|🌟 glowing star|✨ sparkles|⚡ high voltage sign|🔥 fire fire lit|🌈 rainbow|☀️ black sun with rays|⛅ sun behind cloud|☁️ cloud|🌧️ cloud with rain|⛄ snowman without snow|❄️ snowflake|🌊 water wave"], ["Food", "🍏 green apple|🍎 red apple|🍐 pear|🍊 tangerine|🍋 lemon|🍌 banana|🍉 watermelon|🍇 grapes|🍓 strawberry|🍒 cherries|🍑 peach|🥭 mango|🍍 pineapple|🥥 coconut|🥝 kiwifruit|🍅 tomato|🥑 avocado|🥦 broccoli|🌽 ear of maize|🥕 carrot|🥔 potato|🥐 croissant|🍞 bread|🧀 cheese wedge|🥚 egg|🍳 cooking|🥓 bacon|🍔 hamburger|🍟 french fries|🍕 slice of pizza|🌭 hot dog|🥪 sandwich|🌮 taco|🌯 burrito|🍝 spaghetti|🍜 steaming bowl|🍣 sushi|🍱 bento box|🍩 doughnut|🍪 cookie|🎂 birthday cake|🍰 shortcake|🧁 cupcake|🍫 chocolate bar|🍬 candy|🍿 popcorn|☕ hot beverage coffee|🍵 teacup without handle|🍺 beer mug beer|🍻 clinking beer mugs|🥂 clinking glasses|🍷 wine glass|🥃 tumbler glass|🍸 cocktail glass|🍹 tropical drink"], ["Activities", "⚽ soccer ball|🏀 basketball and hoop|🏈 american football|⚾ baseball|🎾 tennis racquet and ball|🏐 volleyball|🎱 billiards|🏓 table tennis paddle and ball|🏸 badminton racquet and shuttlecock|🥅 goal net|⛳ flag in hole|🎣 fishing pole and fish|🎿 ski and ski boot|🏆 trophy|🥇 first place medal|🥈 second place medal|🥉 third place medal|🎮 video game|🕹️ joystick|🎲 game die|🧩 jigsaw puzzle piece|♟️ black chess pawn|🎯 direct hit|🎳 bowling|🎸 guitar|🎹 musical keyboard|🎺 trumpet|🎻 violin|🥁 drum with drumsticks|🎤 microphone|🎧 headphone|🎬 clapper board|🎨 artist palette|🎭 performing arts|🎉 party popper party tada congrats|🎊 confetti ball|🎈 balloon|🎁 wrapped present|🎀 ribbon"], ["Travel", "🚗 automobile|🚕 taxi|🚌 bus|🚎 trolleybus|🏎️ racing car|🚓 police car|🚑 ambulance|🚒 fire engine|🚚 delivery truck|🚜 tractor|🚲 bicycle|🛴 scooter|🏍️ racing motorcycle|🚨 police cars revolving light|🚆 train|🚇 metro|✈️ airplane|🚀 rocket ship launch rocket|🛸 flying saucer|🚁 helicopter|⛵ sailboat|🚢 ship|⚓ anchor|🗺️ world map|🏠 house building|🏡 house with garden|🏢 office building|🏫 school|🏥 hospital|🏰 european castle|🗼 tokyo tower|🗽 statue of liberty|⛺ tent|🌍 earth globe europe-africa|🌋 volcano|🏖️ beach with umbrella|🏝️ desert island"], ["Objects", "⌚ watch|📱 mobile phone|💻 personal computer laptop computer|⌨️ keyboard|🖥️ desktop computer|🖨️ printer|🖱️ three button mouse|💾 floppy disk|💿 optical disc|📷 camera|📹 video camera|🎥 movie camera|📞 telephone receiver|☎️ black telephone|📺 television|📻 radio|⏰ alarm clock|⌛ hourglass|⏳ hourglass with flowing sand|🔋 battery|🔌 electric plug|💡 electric light bulb|🔦 electric torch|🕯️ candle|💸 money with wings|💵 banknote with dollar sign|💰 money bag|💳 credit card|💎 gem stone|🔧 wrench|🔨 hammer|🛠️ hammer and wrench|🔩 nut and bolt|⚙️ gear|🧰 toolbox|🔑 key|🔒 lock|🔓 open lock|🔔 bell|🔕 bell with cancellation stroke|📣 cheering megaphone|📢 public address loudspeaker|📦 package|📫 closed mailbox with raised flag|✉️ envelope|📧 e-mail symbol|📝 memo|📁 file folder|📂 open file folder|📅 calendar|📆 tear-off calendar|📌 pushpin|📍 round pushpin|📎 paperclip|✂️ black scissors|📏 straight ruler|📐 triangular ruler|📊 bar chart|📈 chart with upwards trend|📉 chart with downwards trend|🗑️ wastebasket|📚 books|📖 open book|🔖 bookmark|🔗 link symbol|🧪 test tube|🔬 microscope|🔭 telescope|💊 pill|🩹 adhesive bandage"], ["Symbols", "✅ white heavy check mark done ok check|☑️ ballot box with check|✔️ heavy check mark|❌ cross mark no wrong|❎ negative squared cross mark|➕ heavy plus sign|➖ heavy minus sign|➗ heavy division sign|✖️ heavy multiplication x|❓ black question mark ornament|❔ white question mark ornament|❗ heavy exclamation mark symbol|❕ white exclamation mark ornament|‼️ double exclamation mark|⁉️ exclamation question mark|⚠️ warning sign|🚫 no entry sign|⛔ no entry|🔞 no one under eighteen symbol|♻️ black universal recycling symbol|🔴 large red circle|🟠 large orange circle|🟡 large yellow circle|🟢 large green circle|🔵 large blue circle|🟣 large purple circle|⚫ medium black circle|⚪ medium white circle|🔺 up-pointing red triangle|🔻 down-pointing red triangle|▶️ black right-pointing triangle|⏸️ double vertical bar|⏹️ black square for stop|⏺️ black circle for record|⏭️ black right-pointing double triangle with vertical bar|⏮️ black left-pointing double triangle with vertical bar|🔁 clockwise rightwards and leftwards open circle arrows|🔀 twisted rightwards arrows|⬆️ upwards black arrow|⬇️ downwards black arrow|⬅️ leftwards black arrow|➡️ black rightwards arrow|↩️ leftwards arrow with hook|↪️ rightwards arrow with hook|🆗 squared ok|🆕 squared new|🆒 squared cool|🆓 squared free|🆘 squared sos|ℹ️ information source|💲 heavy dollar sign|©️ copyright sign|®️ registered sign|™️ trade mark sign|🎵 musical note|🎶 multiple musical notes|➰ curly loop|🔝 top with upwards arrow above|🔜 soon with rightwards arrow above|🏁 chequered flag|🚩 triangular flag on post"]];

  // --- small helpers
  const $ = (id) => document.getElementById(id);
  const store = {
    get(key, fallback) {
      try { const v = localStorage.getItem("pychat." + key); return v === null ? fallback : JSON.parse(v); }
      catch { return fallback; }
    },
    set(key, value) {
      try { localStorage.setItem("pychat." + key, JSON.stringify(value)); } catch { /* private mode */ }
    },
  };
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function key(name) { return String(name).normalize("NFKC").toLowerCase(); }
  function clock(ts) {
    const d = typeof ts === "number" ? new Date(ts * 1000) : new Date();
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }
  function nickClass(nick) {
    let h = 0;
    for (const ch of key(nick)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    return "n" + (h % 12);
  }
  function formatSize(n) {
    const units = ["bytes", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? n + " bytes" : n.toFixed(n < 10 ? 1 : 0) + " " + units[i];
  }
  function escapeRe(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

  // --- SHA-256: Web Crypto where the page is a secure context (https,
  // localhost); on plain http from the LAN (crypto.subtle is missing there)
  // this small implementation of FIPS 180-4 does the same.
  const K256 = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
  class Sha256 {
    constructor() {
      this.h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
      this.buf = new Uint8Array(64); this.used = 0; this.length = 0; this.w = new Uint32Array(64);
    }
    update(bytes) {
      let i = 0;
      this.length += bytes.length;
      if (this.used) {
        const take = Math.min(64 - this.used, bytes.length);
        this.buf.set(bytes.subarray(0, take), this.used); this.used += take; i = take;
        if (this.used < 64) return this;
        this.block(this.buf, 0); this.used = 0;
      }
      for (; i + 64 <= bytes.length; i += 64) this.block(bytes, i);
      if (i < bytes.length) { this.buf.set(bytes.subarray(i)); this.used = bytes.length - i; }
      return this;
    }
    block(b, o) {
      const w = this.w, h = this.h;
      for (let t = 0; t < 16; t++) w[t] = (b[o + 4 * t] << 24) | (b[o + 4 * t + 1] << 16) | (b[o + 4 * t + 2] << 8) | b[o + 4 * t + 3];
      for (let t = 16; t < 64; t++) {
        const x = w[t - 15], y = w[t - 2];
        const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
        const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
        w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
      }
      let a = h[0], b2 = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
      for (let t = 0; t < 64; t++) {
        const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K256[t] + w[t]) | 0;
        const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        const t2 = (S0 + ((a & b2) ^ (a & c) ^ (b2 & c))) | 0;
        k = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b2; b2 = a; a = (t1 + t2) | 0;
      }
      h[0] += a; h[1] += b2; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
    }
    hex() {
      const bits = this.length * 8;
      const pad = new Uint8Array(((this.used < 56) ? 56 : 120) - this.used + 8);
      pad[0] = 0x80;
      const view = new DataView(pad.buffer);
      view.setUint32(pad.length - 8, Math.floor(bits / 0x100000000));
      view.setUint32(pad.length - 4, bits >>> 0);
      this.update(pad);
      return Array.from(this.h, (x) => x.toString(16).padStart(8, "0")).join("");
    }
  }
  window.PyChatSha256 = Sha256;  // for the test suite: checked against Web Crypto
  function hexOf(buffer) {
    return Array.from(new Uint8Array(buffer), (x) => x.toString(16).padStart(2, "0")).join("");
  }
  async function sha256Hex(blob) {
    if (window.crypto && crypto.subtle && window.isSecureContext) {
      return hexOf(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
    }
    const h = new Sha256();
    for (let at = 0; at < blob.size; at += 1 << 20) {
      h.update(new Uint8Array(await blob.slice(at, at + (1 << 20)).arrayBuffer()));
    }
    return h.hex();
  }
  function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x2000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x2000));
    return btoa(s);
  }
  function fromBase64(text) {
    const s = atob(text);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function randomId() {
    const b = new Uint8Array(6);
    crypto.getRandomValues(b);  // works on plain http too (randomUUID does not)
    return Array.from(b, (x) => x.toString(36)).join("").slice(0, 8);
  }

  // --- the state of the session
  const S = {
    ws: null, nick: store.get("nick", ""), password: null, token: null, instance: null,
    registered: false, everRegistered: false, fatal: false, wanted: false,
    lastIds: new Map(),     // room key -> newest message id seen there
    via: new Map(),         // nick key -> the other server of the network she is on
    seen: new Set(),        // message ids shown (a resend's echo must not show twice)
    backoff: BACKOFF_START, retry: null, lastRx: 0, pinged: false, probe: 0, ghostTries: 0,
    limits: {}, away: null, cidPrefix: "w" + randomId(), cidCount: 0,
    outbox: new Map(),      // cid -> request, until the server echoes it
    queue: [], tokens: 0, tokenTime: 0, pump: null,
    convs: new Map(), current: null, switchTo: null,
    transfers: new Map(), offersOut: new Map(),
    lastTyping: 0, sound: store.get("sound", true), ignored: new Set(store.get("ignored", [])),
  };

  // --- conversations: each room and private partner has a pane
  function roomKey(name) { return "r:" + key(name); }
  function pmKey(nick) { return "p:" + key(nick); }
  function conv(kind, name) {
    const k = kind === "room" ? roomKey(name) : pmKey(name);
    let c = S.convs.get(k);
    if (!c) {
      c = { key: k, kind, name, unread: 0, mention: false, users: new Map(), ops: new Set(), topic: "",
            marker: null, lastFrom: null, lastTs: 0, gone: false, typing: new Map(), pane: el("div", "pane") };
      c.pane.hidden = true;  // (new messages are read out by the one live region, #live)
      $("log").appendChild(c.pane);
      S.convs.set(k, c);
      renderConvs();
    }
    return c;
  }
  function current() { return S.convs.get(S.current) || null; }
  function roomOf(name) { return S.convs.get(roomKey(name)) || null; }
  function visible(c) { return c && c.key === S.current && !document.hidden; }

  function show(k) {
    const before = current();
    if (before && before.key !== k && before.marker) { before.marker.remove(); before.marker = null; }
    S.current = k;
    for (const c of S.convs.values()) c.pane.hidden = c.key !== k;
    const c = current();
    if (c) { c.unread = 0; c.mention = false; }
    renderHeader(); renderConvs(); renderPeople(); renderTyping(); renderPending(); updateTitle();
    scrollDown(true);
    document.body.classList.remove("drawer-open");
    $("menu").setAttribute("aria-expanded", "false");
  }
  function closeConv(c) {
    c.pane.remove();
    S.convs.delete(c.key);
    if (S.current === c.key) {
      const lobby = roomOf(LOBBY) || S.convs.values().next().value;
      S.current = null;
      if (lobby) show(lobby.key);
    }
    renderConvs();
  }

  function renderHeader() {
    const c = current();
    $("conv-title").textContent = c ? (c.kind === "room" ? c.name : "@ " + c.name) : "PyChat";
    $("conv-topic").textContent = c && c.kind === "room" ? c.topic : (c && c.gone ? c.name + " has left the chat" : "");
    $("input").placeholder = c ? "Message " + (c.kind === "room" ? c.name : c.name) : "Message";
  }
  function renderConvs() {
    const list = $("convs");
    list.textContent = "";
    const items = Array.from(S.convs.values()).sort((a, b) =>
      (a.kind === b.kind ? 0 : a.kind === "room" ? -1 : 1) || key(a.name).localeCompare(key(b.name)));
    for (const c of items) {
      const li = el("li");
      const b = el("button", c.gone ? "gone" : "");
      b.type = "button";
      b.dataset.conv = c.key;
      if (c.key === S.current) b.setAttribute("aria-current", "true");
      const label = el("span", "name" + (c.unread ? " unread" : ""), (c.kind === "room" ? "" : "@ ") + c.name + (c.gone ? " (left)" : ""));
      b.appendChild(label);
      if (c.unread) {
        const badge = el("span", "badge", c.unread);
        badge.setAttribute("aria-label", c.unread + " unread");
        b.appendChild(badge);
      }
      li.appendChild(b);
      list.appendChild(li);
    }
  }
  function renderPeople() {
    const c = current();
    const list = $("people");
    list.textContent = "";
    if (!c) return;
    if (c.kind !== "room") {
      $("people-title").textContent = "Private";
      list.appendChild(el("li", "note", "A private conversation with " + c.name + "."));
      return;
    }
    const people = Array.from(c.users.values()).sort((a, b) => key(a.nick).localeCompare(key(b.nick)));
    $("people-title").textContent = people.length + " in " + c.name;
    for (const p of people) {
      const li = el("li");
      const b = el("button", p.away !== null ? "away" : "");
      b.type = "button";
      b.dataset.nick = p.nick;
      const me = key(p.nick) === key(S.nick);
      const via = S.via.get(key(p.nick));
      let label = (c.ops.has(key(p.nick)) ? "@" : "") + p.nick + (me ? " (you)" : "") + (p.away !== null ? " (away)" : "") + (via ? " · " + via : "");
      b.appendChild(el("span", "name " + nickClass(p.nick), label));
      b.title = me ? "You" : (p.away ? "Away: " + p.away : "Talk privately with " + p.nick);
      li.appendChild(b);
      list.appendChild(li);
    }
  }
  function renderTyping() {
    const c = current();
    const now = Date.now();
    const names = c ? Array.from(c.typing.entries()).filter(([, until]) => until > now).map(([n]) => n) : [];
    $("typing").textContent = names.length === 0 ? "" : names.length === 1 ? names[0] + " is typing..."
      : names.length <= 3 ? names.join(", ") + " are typing..." : "Several people are typing...";
  }
  function renderPending() {
    const list = $("pending");
    list.textContent = "";
    const c = current();
    const now = Date.now();
    for (const req of S.outbox.values()) {
      const here = req.type === "pm" ? pmKey(req.to) : roomKey(req.room);
      if (!c || here !== c.key || (S.registered && now - req.at < SHOW_PENDING_AFTER)) continue;
      list.appendChild(el("li", "", (req.action ? "* " + S.nick + " " : "") + req.text));
    }
  }
  function updateTitle() {
    let n = 0;
    for (const c of S.convs.values()) n += c.unread;
    const c = current();
    $("menu").classList.toggle("unread", n > 0);
    document.title = (n ? "(" + n + ") " : "") + "PyChat" + (c ? " \u2014 " + c.name : "");
  }
  function setStatus(text, down) {
    $("status").textContent = text;
    $("status").classList.toggle("down", !!down);
    $("banner").hidden = !down;
    $("banner").textContent = down ? text : "";
  }

  // --- drawing lines
  function nearBottom() { const log = $("log"); return log.scrollHeight - log.scrollTop - log.clientHeight < 80; }
  function scrollDown(force) { const log = $("log"); if (force || nearBottom()) log.scrollTop = log.scrollHeight; }
  function addLine(c, node) {
    const stick = c.key === S.current && nearBottom();
    c.pane.appendChild(node);
    while (c.pane.childElementCount > MAX_LINES) c.pane.firstElementChild.remove();
    if (stick) scrollDown(true);
  }
  function system(c, text, cls) {
    if (!c) c = current();
    if (!c) return;
    const line = el("div", "msg system" + (cls ? " " + cls : ""));
    line.appendChild(el("span", "time", clock()));
    line.appendChild(el("span", "", text));
    c.lastFrom = null;
    addLine(c, line);
  }
  function richText(parent, text) {
    // Links become <a> (http(s) only); everything else is plain text nodes.
    let at = 0;
    for (const m of text.matchAll(URL_RE)) {
      if (m.index > at) parent.appendChild(document.createTextNode(text.slice(at, m.index)));
      const a = el("a", "", m[0]);
      a.href = /^www\./i.test(m[0]) ? "https://" + m[0] : m[0];
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      parent.appendChild(a);
      at = m.index + m[0].length;
    }
    if (at < text.length) parent.appendChild(document.createTextNode(text.slice(at)));
  }
  function mentions(text) {
    if (!S.nick) return false;
    return new RegExp("(^|[^\\p{L}\\p{N}_])" + escapeRe(S.nick) + "($|[^\\p{L}\\p{N}_])", "iu").test(text);
  }
  function drawMessage(c, m, live) {
    const from = String(m.from || "");
    const text = String(m.text || "");
    const ts = typeof m.ts === "number" ? m.ts : Date.now() / 1000;
    const mine = key(from) === key(S.nick);
    const mention = !mine && mentions(text);
    if (live && !visible(c) && !c.marker && !mine) {
      c.marker = el("div", "marker", "new messages");
      c.marker.setAttribute("role", "separator");
      addLine(c, c.marker);
      c.lastFrom = null;
    }
    const line = el("div", "msg" + (m.action ? " action" : "") + (mention ? " mention" : ""));
    if (m.id !== undefined) line.dataset.id = m.id;
    const grouped = !m.action && c.lastFrom === key(from) && ts - c.lastTs < GROUP_WITHIN;
    if (m.action) {
      const body = el("div", "text");
      body.appendChild(el("span", "time", clock(ts) + " "));
      body.appendChild(el("span", "nick " + nickClass(from), "* " + from + " "));
      richText(body, text);
      line.appendChild(body);
    } else {
      if (!grouped) {
        const head = el("div", "head");
        head.appendChild(el("span", "nick " + nickClass(from), from));
        head.appendChild(el("span", "time", clock(ts)));
        line.appendChild(head);
      }
      const body = el("div", "text");
      richText(body, text);
      line.appendChild(body);
    }
    c.lastFrom = m.action ? null : key(from);
    c.lastTs = ts;
    c.typing.delete(from);
    addLine(c, line);
    if (!live || mine) return;
    if (!visible(c)) {
      c.unread += 1;
      if (mention) c.mention = true;
      renderConvs(); updateTitle();
    }
    if (c.key === S.current) $("live").textContent = (m.action ? from + " " : from + ": ") + text;
    if (document.hidden || mention || c.kind === "pm" && c.key !== S.current) {
      notify((c.kind === "room" ? from + " in " + c.name : from), text, c);
    }
  }
  let lastDing = 0;
  function notify(title, body, c) {
    if (S.sound && Date.now() - lastDing > 1000) {
      lastDing = Date.now();
      const audio = new Audio("/ding.wav");
      audio.play().catch(() => {});  // autoplay rules: a page never touched stays quiet
    }
    if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
    try {
      const n = new Notification(title, { body: body.slice(0, 200), tag: c.key, icon: "/icon.png" });
      n.onclick = () => { window.focus(); show(c.key); n.close(); };
    } catch { /* Android Chrome wants a service worker for notifications: the ding stays */ }
  }

  // --- the connection: hello (with the resume token), backoff, keepalive
  function wsUrl() { return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws"; }
  function connect() {
    clearTimeout(S.retry); S.retry = null;
    if (S.ws) { S.ws.onclose = null; S.ws.close(); }
    S.registered = false;
    setStatus(S.everRegistered ? "Reconnecting..." : "Connecting...", S.everRegistered);
    let ws;
    try { ws = new WebSocket(wsUrl()); } catch { dropped(); return; }
    S.ws = ws;
    ws.onopen = () => { S.lastRx = Date.now(); S.pinged = false; sendNow(hello()); };
    ws.onmessage = (e) => {
      S.lastRx = Date.now(); S.pinged = false;
      let event;
      try { event = JSON.parse(e.data); } catch { return; }
      if (event && typeof event === "object" && typeof event.type === "string") receive(event);
    };
    ws.onclose = () => { if (S.ws === ws) dropped(); };
  }
  function hello() {
    const h = { type: "hello", nick: S.nick, client: "pychat-" + VERSION };
    if (S.password !== null) h.password = S.password;
    if (S.token) h.token = S.token;
    if (S.lastIds.size && S.instance) {
      h.instance = S.instance;
      h.after = {};
      for (const c of S.convs.values()) {
        if (c.kind === "room" && S.lastIds.has(c.key)) h.after[c.name] = S.lastIds.get(c.key);
      }
    }
    return h;
  }
  // A link that stopped answering: do not wait for its closing handshake.
  function abandon() {
    const ws = S.ws;
    S.probe = 0;
    if (!ws) return;
    ws.onclose = null;
    ws.close();
    dropped();
  }
  function dropped() {
    const was = S.registered;
    S.registered = false; S.ws = null;
    failTransfers("the connection was lost");
    renderPending();
    if (S.fatal || !S.wanted) return;
    if (!S.everRegistered) {
      loginError("Cannot reach the chat server. Trying again...");
    }
    const wait = was ? BACKOFF_START : S.backoff;
    S.backoff = was ? BACKOFF_START * 2 : Math.min(BACKOFF_MAX, S.backoff * 2);
    setStatus("Disconnected. Reconnecting in " + (wait / 1000).toFixed(1) + " s...", S.everRegistered);
    S.retry = setTimeout(connect, wait);
  }
  // Back from the background or back online: reconnect now, or (a socket a
  // sleeping phone left open may be dead) ask the server for a sign of life.
  function reconnectNow() {
    if (!S.wanted || S.fatal) return;
    if (!S.ws) { S.backoff = BACKOFF_START; connect(); return; }
    if (S.ws.readyState === WebSocket.OPEN && Date.now() - S.lastRx > PROBE_WAIT) {
      S.probe = Date.now();
      sendNow({ type: "ping", data: "awake" });
    }
  }
  setInterval(() => {
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return;
    const silent = Date.now() - S.lastRx;
    if (silent > DEAD_AFTER || (S.probe && S.lastRx < S.probe && Date.now() - S.probe > PROBE_WAIT)) {
      abandon(); return;
    }
    if (silent > KEEPALIVE && !S.pinged) { S.pinged = true; sendNow({ type: "ping", data: "keepalive" }); }
    renderTyping();
  }, 2000);

  function sendNow(obj) {
    if (S.ws && S.ws.readyState === WebSocket.OPEN) { S.ws.send(JSON.stringify(obj)); return true; }
    return false;
  }
  // Requests go out paced a little under the server's flood bucket, as the
  // desktop client does; typing notices cost nothing here.
  function enqueue(req) { S.queue.push(req); pump(); }
  function pump() {
    if (S.pump || !S.registered) return;
    const burst = Math.max(1, Number(S.limits.flood_burst || 20) - 2);
    const rate = Number(S.limits.flood_rate || 5) * 0.9;
    while (S.queue.length && S.registered) {
      const now = Date.now();
      S.tokens = Math.min(burst, S.tokens + (now - S.tokenTime) / 1000 * rate);
      S.tokenTime = now;
      const req = S.queue[0];
      if ((req.type === "msg" || req.type === "pm") && !S.outbox.has(req.cid)) { S.queue.shift(); continue; }
      if (req.type !== "typing") {
        if (S.tokens < 1) { S.pump = setTimeout(() => { S.pump = null; pump(); }, (1 - S.tokens) / rate * 1000 + 5); return; }
        S.tokens -= 1;
      }
      S.queue.shift();
      if (!sendNow(req)) return;
    }
  }
  function say(text, action, c) {
    const cid = S.cidPrefix + "-" + (++S.cidCount);
    const req = c.kind === "room" ? { type: "msg", room: c.name, text, cid } : { type: "pm", to: c.name, text, cid };
    if (action) req.action = true;
    S.outbox.set(cid, req);
    Object.defineProperty(req, "at", { value: Date.now(), enumerable: false });
    enqueue(req);
    renderPending();
    setTimeout(renderPending, SHOW_PENDING_AFTER + 50);
  }
  function confirm(m) {
    if (typeof m.cid === "string" && key(m.from || "") === key(S.nick) && S.outbox.delete(m.cid)) renderPending();
  }

  // --- events from the server: on[type](event)
  function receive(event) {
    const handler = Object.prototype.hasOwnProperty.call(on, event.type) ? on[event.type] : null;
    if (handler) handler(event);
  }
  function seenBefore(m) {
    if (typeof m.id !== "number") return false;
    if (S.seen.has(m.id)) return true;
    S.seen.add(m.id);
    if (S.seen.size > MAX_SEEN) S.seen.delete(S.seen.values().next().value);
    return false;
  }
  function noteId(room, id) {
    if (typeof id !== "number") return;
    const k = roomKey(room);
    if (!S.lastIds.has(k) || S.lastIds.get(k) < id) S.lastIds.set(k, id);
  }
  function setUser(c, nick, away) { c.users.set(key(nick), { nick, away: away === undefined ? null : away }); }
  function roomsWith(nick) { return Array.from(S.convs.values()).filter((c) => c.kind === "room" && c.users.has(key(nick))); }
  const QUIT_REASONS = new Set(["quit", "disconnected", "timeout", "kicked", "banned", "backlog", "flood",
                                "line_too_long", "error", "shutdown"]);

  const on = {
    welcome(e) {
      S.registered = true; S.everRegistered = true; S.ghostTries = 0; S.backoff = BACKOFF_START;
      S.nick = String(e.nick || S.nick); store.set("nick", S.nick);
      S.limits = e.limits && typeof e.limits === "object" ? e.limits : {};
      if (e.instance !== S.instance) { S.instance = e.instance; S.lastIds.clear(); S.seen.clear(); }
      S.token = typeof e.token === "string" ? e.token : null;
      const lobby = conv("room", String(e.room || LOBBY));
      const kept = new Set((e.resumed ? (e.rooms || []) : [lobby.name]).map((r) => roomKey(r)));
      const again = [];
      for (const c of S.convs.values()) {
        if (c.kind === "room" && !kept.has(c.key)) {
          const req = { type: "join", room: c.name };
          if (S.lastIds.has(c.key)) req.after = S.lastIds.get(c.key);
          again.push(req);
        }
      }
      if (S.away !== null && !e.resumed) again.push({ type: "away", message: S.away });
      const rest = S.queue.filter((r) => r.type !== "msg" && r.type !== "pm" && !r.type.startsWith("file_") && r.type !== "typing");
      S.queue = again.concat(Array.from(S.outbox.values()), rest);
      S.tokens = Math.max(1, Number(S.limits.flood_burst || 20) - 2); S.tokenTime = Date.now();
      $("login").hidden = true; $("chat").hidden = false;
      setStatus("Connected as " + S.nick, false);
      if (!S.current) show(lobby.key); else { renderHeader(); renderPeople(); }
      if (e.motd && !S.shownMotd) { S.shownMotd = true; system(lobby, "Message of the day: " + e.motd); }
      if (!S.welcomed) {
        S.welcomed = true;
        system(lobby, "You are " + S.nick + " in " + lobby.name + ". Type /help for commands.");
      } else if (!e.resumed) {
        system(current(), "Connected again.");
      }
      pump();
      renderPending();
    },
    history(e) {
      const c = conv("room", String(e.room || LOBBY));
      const last = S.lastIds.has(c.key) ? S.lastIds.get(c.key) : -1;
      for (const m of Array.isArray(e.messages) ? e.messages : []) {
        if (!m || typeof m !== "object") continue;
        confirm(m);
        if (typeof m.id === "number" && m.id <= last) continue;
        noteId(c.name, m.id);
        if (seenBefore(m) || S.ignored.has(key(m.from || ""))) continue;
        drawMessage(c, m, false);
      }
      if (S.switchTo === c.key) { S.switchTo = null; show(c.key); }
    },
    users(e) {
      const c = roomOf(e.room || LOBBY);
      if (!c || !Array.isArray(e.users)) return;
      c.users.clear();
      const away = e.away && typeof e.away === "object" ? e.away : {};
      const via = e.via && typeof e.via === "object" ? e.via : {};
      for (const n of e.users) {
        setUser(c, String(n), Object.prototype.hasOwnProperty.call(away, n) ? String(away[n]) : null);
        if (Object.prototype.hasOwnProperty.call(via, n)) S.via.set(key(String(n)), String(via[n])); else S.via.delete(key(String(n)));
      }
      c.ops = new Set((Array.isArray(e.ops) ? e.ops : []).map(key));
      if (c.key === S.current) renderPeople();
      if (S.showUsers === c.key) { S.showUsers = null; listUsers(c); }
    },
    topic(e) {
      const c = roomOf(e.room || LOBBY);
      if (!c) return;
      c.topic = String(e.topic || "");
      if (e.by) system(c, e.by + (c.topic ? " set the topic: " + c.topic : " cleared the topic"));
      else if (S.askedTopic === c.key) system(c, c.topic ? "Topic: " + c.topic : "No topic is set.");
      S.askedTopic = null;
      if (c.key === S.current) renderHeader();
    },
    join(e) {
      const nick = String(e.nick || "");
      const c = conv("room", String(e.room || LOBBY));
      setUser(c, nick, e.away === undefined ? null : String(e.away || ""));
      if (e.via) S.via.set(key(nick), String(e.via)); else S.via.delete(key(nick));
      if (key(nick) !== key(S.nick)) system(c, nick + " joined " + c.name + (e.via ? " (on " + e.via + ")" : ""));
      const partner = S.convs.get(pmKey(nick));
      if (partner && partner.gone) { partner.gone = false; system(partner, nick + " is back."); renderConvs(); }
      if (c.key === S.current) renderPeople();
    },
    leave(e) {
      const nick = String(e.nick || "");
      const c = roomOf(e.room || LOBBY);
      const why = e.reason === "part" ? "left" : e.reason === "kick" ? "was put out by " + e.by : "left the chat (" + e.reason + ")";
      const extra = e.message ? ": " + e.message : "";
      if (key(nick) === key(S.nick)) {
        if (c) { S.lastIds.delete(c.key); closeConv(c); }
        system(current(), "You left " + (e.room || LOBBY) + (e.reason === "kick" ? " (put out by " + e.by + extra + ")" : ""));
        return;
      }
      if (c) {
        c.users.delete(key(nick)); c.ops.delete(key(nick));
        system(c, nick + " " + why + extra);
        if (c.key === S.current) renderPeople();
      }
      const partner = S.convs.get(pmKey(nick));
      if (partner && QUIT_REASONS.has(e.reason) && !partner.gone && roomsWith(nick).length === 0) {
        partner.gone = true;
        system(partner, nick + " left the chat (" + e.reason + ")");
        renderConvs(); renderHeader();
      }
    },
    nick(e) {
      const old = String(e.old || ""), now = String(e.new || "");
      const me = key(old) === key(S.nick);
      if (me) { S.nick = now; store.set("nick", now); setStatus("Connected as " + now, false); }
      for (const c of roomsWith(old)) {
        const u = c.users.get(key(old));
        c.users.delete(key(old));
        setUser(c, now, u ? u.away : null);
        if (c.ops.delete(key(old))) c.ops.add(key(now));
        system(c, me ? "You are now known as " + now : old + " is now known as " + now);
      }
      const partner = S.convs.get(pmKey(old));
      if (partner && !me) {
        S.convs.delete(partner.key);
        partner.name = now; partner.key = pmKey(now);
        S.convs.set(partner.key, partner);
        if (S.current === pmKey(old)) S.current = partner.key;
        system(partner, old + " is now known as " + now);
      }
      renderConvs(); renderPeople(); renderHeader();
    },
    away(e) {
      const nick = String(e.nick || "");
      for (const c of roomsWith(nick)) setUser(c, c.users.get(key(nick)).nick, e.away ? String(e.message || "") : null);
      if (key(nick) === key(S.nick)) system(current(), e.away ? "You are marked away" + (e.message ? ": " + e.message : "") : "You are back.");
      renderPeople();
    },
    msg(e) {
      confirm(e);
      const c = roomOf(e.room || LOBBY);
      if (!c) return;
      if (typeof e.id === "number" && S.lastIds.has(c.key) && e.id <= S.lastIds.get(c.key)) return;
      noteId(c.name, e.id);
      if (seenBefore(e) || S.ignored.has(key(e.from || "")) && key(e.from) !== key(S.nick)) return;
      drawMessage(c, e, true);
      if (c.key === S.current) renderTyping();
    },
    pm(e) {
      confirm(e);
      const mine = key(e.from || "") === key(S.nick);
      if (seenBefore(e) || (!mine && S.ignored.has(key(e.from || "")))) return;
      const c = conv("pm", String(mine ? e.to : e.from));
      drawMessage(c, e, true);
    },
    notice(e) { system(S.convs.get(pmKey(e.nick || "")) || (e.room && roomOf(e.room)) || current(), String(e.text || "")); },
    whois(e) { system(current(), String(e.text || "")); },
    stats(e) { system(current(), String(e.text || "")); },
    typing(e) {
      const c = roomOf(e.room || LOBBY);
      if (!c || S.ignored.has(key(e.nick || ""))) return;
      c.typing.set(String(e.nick), Date.now() + TYPING_SHOWN_FOR);
      if (c.key === S.current) renderTyping();
      setTimeout(renderTyping, TYPING_SHOWN_FOR + 100);
    },
    rooms(e) {
      const lines = (Array.isArray(e.rooms) ? e.rooms : []).map((r) =>
        r.room + " (" + r.users + ")" + (r.topic ? ": " + r.topic : ""));
      system(current(), lines.length ? "Rooms: " + lines.join("; ") : "No rooms.");
    },
    mode(e) { const c = roomOf(e.room || LOBBY); if (c) { if (e.op) c.ops.add(key(e.nick)); else c.ops.delete(key(e.nick)); system(c, e.by + (e.op ? " made " : " took operator from ") + e.nick + (e.op ? " an operator" : "")); renderPeople(); } },
    moderation(e) { system(current(), e.nick + ": " + e.action + " by " + e.by + (e.reason ? " (" + e.reason + ")" : "")); },
    op(e) { system(current(), e.ok ? "You are a server operator." : "Not an operator."); },
    pong() {},
    ping(e) { sendNow({ type: "pong", data: e.data }); },
    bye(e) {
      if (e.code === "kicked" || e.code === "banned") { S.fatal = true; system(current(), String(e.reason || "You were put out.")); setStatus(String(e.reason || "Disconnected."), true); }
    },
    error(e) {
      const code = String(e.code || "");
      if (!S.registered) { registrationError(code, String(e.message || code)); return; }
      if (typeof e.cid === "string" && S.outbox.has(e.cid)) {
        const req = S.outbox.get(e.cid);
        if (code === "rate_limited") { setTimeout(() => { if (S.outbox.has(e.cid)) enqueue(req); }, 1000); return; }
        S.outbox.delete(e.cid);
        renderPending();
        const c = req.type === "pm" ? conv("pm", req.to) : roomOf(req.room) || current();
        system(c, "Not sent: " + (e.message || code) + " (" + req.text.slice(0, 80) + ")", "error");
        return;
      }
      if (e.request === "join") S.switchTo = null;
      system(current(), String(e.message || code), "error");
    },
  };

  function registrationError(code, message) {
    if (code === "nick_taken" && S.everRegistered && S.ghostTries < 20) {
      // Our old connection may still hold the nick until the server notices.
      S.ghostTries += 1;
      setStatus(message + " Waiting for it to free up...", true);
      setTimeout(() => sendNow(hello()), Math.min(BACKOFF_MAX, 1000 * S.ghostTries));
      return;
    }
    if (code === "auth_blocked" || code === "banned") { S.fatal = true; S.wanted = false; }
    if (code === "auth_failed") {
      S.password = null;
      $("login-password-row").hidden = false;
    }
    showLogin(message);
    if (code === "auth_failed") $("login-password").focus(); else $("login-nick").select();
  }

  // --- files through the relay: offers, a window of 16 chunks per receiver,
  // the SHA-256 checked before a received file is offered for saving.
  const IMAGE_TYPES = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", bmp: "image/bmp" };
  function mimeFor(name) {
    const ext = String(name).split(".").pop().toLowerCase();
    return IMAGE_TYPES[ext] || "application/octet-stream";
  }
  async function offerFile(file, c) {
    if (!c) return;
    const cid = S.cidPrefix + "-" + (++S.cidCount);
    system(c, "Preparing " + file.name + " (" + formatSize(file.size) + ")...");
    let digest;
    try { digest = await sha256Hex(file); } catch (err) { system(c, "Cannot read " + file.name + ": " + err.message, "error"); return; }
    S.offersOut.set(cid, { file, conv: c });
    const req = { type: "file_offer", name: file.name, size: file.size, sha256: digest, cid };
    if (c.kind === "pm") req.to = c.name; else req.room = c.name;
    if (!sendNow(req)) system(c, "Not offered: not connected.", "error");
  }
  function fileCard(t, c) {
    t.card = el("div", "file");
    t.card.dataset.transfer = t.id;
    t.fname = el("div", "fname", (t.mine ? "You offer " : t.from + " offers ") + t.name + " (" + formatSize(t.size) + ")");
    t.fstate = el("div", "fstate");
    t.bar = el("progress");
    t.bar.max = Math.max(1, t.size); t.bar.value = 0; t.bar.hidden = true;
    t.bar.setAttribute("aria-label", "Progress of " + t.name);
    t.actions = el("div", "actions");
    t.card.append(t.fname, t.fstate, t.bar, t.actions);
    addLine(c, t.card);
    c.lastFrom = null;
  }
  function button(text, cls, onclick) {
    const b = el("button", cls, text);
    b.type = "button";
    b.addEventListener("click", onclick);
    return b;
  }
  function setState(t, text, cls) {
    t.fstate.textContent = text;
    t.card.classList.remove("ok", "bad");
    if (cls) t.card.classList.add(cls);
  }
  function outgoingSummary(t) {
    const parts = [];
    const waiting = Array.from(t.waiting);
    const sending = Array.from(t.streams.keys()).filter((n) => !t.results.has(n) && !t.waiting.has(n));
    if (waiting.length) parts.push("waiting for " + waiting.join(", "));
    if (sending.length) parts.push("sending to " + sending.join(", "));
    const done = [], declined = [], failed = [];
    for (const [n, r] of t.results) (r === "ok" ? done : r === "declined" ? declined : failed).push(n + (r === "ok" || r === "declined" ? "" : " (" + r + ")"));
    if (done.length) parts.push("delivered to " + done.join(", "));
    if (declined.length) parts.push("declined by " + declined.join(", "));
    if (failed.length) parts.push("failed for " + failed.join(", "));
    const finished = !waiting.length && !sending.length;
    setState(t, parts.join("; ") || "offered", finished ? (failed.length ? "bad" : "ok") : "");
    if (finished) { t.actions.textContent = ""; t.bar.hidden = true; }
  }
  const fileOn = {
    file_offer(e) {
      const id = String(e.id || "");
      if (!id || typeof e.size !== "number" || typeof e.sha256 !== "string") return;
      const mine = key(e.from || "") === key(S.nick) && S.offersOut.has(e.cid);
      const t = { id, name: String(e.name || "file"), size: e.size, sha256: e.sha256, from: String(e.from || ""), mine };
      let c;
      if (mine) {
        const out = S.offersOut.get(e.cid);
        S.offersOut.delete(e.cid);
        Object.assign(t, { file: out.file, waiting: new Set((e.recipients || []).map(String)), streams: new Map(), results: new Map() });
        c = out.conv;
        fileCard(t, c);
        t.actions.appendChild(button("Cancel", "", () => { sendNow({ type: "file_cancel", id }); for (const n of t.waiting) t.results.set(n, "cancelled"); t.waiting.clear(); for (const [n, s] of t.streams) { s.stop = true; if (!t.results.has(n)) t.results.set(n, "cancelled"); } outgoingSummary(t); }));
        outgoingSummary(t);
      } else {
        if (key(e.from || "") === key(S.nick)) return;  // our offer from another tab
        Object.assign(t, { state: "offered", chunks: [], received: 0, hash: null });
        c = e.room ? roomOf(e.room) || current() : conv("pm", t.from);
        fileCard(t, c);
        setState(t, "Nothing is saved unless you accept.");
        t.actions.append(button("Accept", "primary", () => acceptFile(t)), button("Decline", "", () => declineFile(t)));
        if (!visible(c)) { c.unread += 1; renderConvs(); updateTitle(); }  // like a message
        if (!visible(c) || document.hidden) notify(t.from + " offers a file", t.name, c);
      }
      S.transfers.set(id, t);
    },
    file_accept(e) {
      const t = S.transfers.get(String(e.id));
      const nick = String(e.nick || "");
      if (!t || !t.mine || t.streams.has(nick)) return;
      t.waiting.delete(nick);
      const s = { seq: 0, acked: 0, sent: 0, stop: false, wake: null, ws: S.ws };
      t.streams.set(nick, s);
      outgoingSummary(t);
      stream(t, nick, s);
    },
    file_ack(e) {
      const t = S.transfers.get(String(e.id));
      const s = t && t.mine ? t.streams.get(String(e.nick)) : null;
      if (!s) return;
      s.acked += 1;
      if (s.wake) { const w = s.wake; s.wake = null; w(); }
    },
    file_decline(e) {
      const t = S.transfers.get(String(e.id));
      if (!t || !t.mine) return;
      t.waiting.delete(String(e.nick)); t.results.set(String(e.nick), "declined");
      outgoingSummary(t);
    },
    file_result(e) {
      const t = S.transfers.get(String(e.id));
      if (!t || !t.mine) return;
      t.waiting.delete(String(e.nick)); t.results.set(String(e.nick), e.ok ? "ok" : String(e.reason || "failed"));
      outgoingSummary(t);
    },
    file_chunk(e) {
      const t = S.transfers.get(String(e.id));
      if (!t || t.mine || t.state !== "receiving") return;
      let data;
      try { data = fromBase64(String(e.data || "")); } catch { endIncoming(t, "a damaged chunk"); return; }
      t.chunks.push(data);
      t.received += data.length;
      if (t.hash) t.hash.update(data);
      if (t.received > t.size) { endIncoming(t, "more data than offered"); return; }
      sendNow({ type: "file_ack", id: t.id, seq: e.seq });
      t.bar.value = t.received;
      setState(t, "Receiving: " + formatSize(t.received) + " of " + formatSize(t.size));
    },
    file_done(e) {
      const t = S.transfers.get(String(e.id));
      if (t && !t.mine && t.state === "receiving") finishIncoming(t);
    },
    file_cancel(e) {
      const t = S.transfers.get(String(e.id));
      if (!t) return;
      const why = String(e.reason || "cancelled");
      if (t.mine) {
        const nick = String(e.nick || "");
        const s = t.streams.get(nick);
        if (s) s.stop = true;
        t.waiting.delete(nick);
        if (!t.results.has(nick)) t.results.set(nick, why);
        outgoingSummary(t);
      } else if (t.state === "receiving" || t.state === "offered") {
        t.state = "cancelled"; t.chunks = []; t.actions.textContent = ""; t.bar.hidden = true;
        setState(t, "Cancelled by " + (e.nick || "the sender") + " (" + why + ")", "bad");
      }
    },
  };
  Object.assign(on, fileOn);

  async function stream(t, nick, s) {
    let offset = 0;
    try {
      do {
        while (s.seq - s.acked >= FILE_WINDOW && !s.stop) await new Promise((resolve) => { s.wake = resolve; });
        if (s.stop) return;
        if (S.ws !== s.ws || !S.registered) throw new Error("the connection was lost");
        const bytes = new Uint8Array(await t.file.slice(offset, offset + FILE_CHUNK).arrayBuffer());
        sendNow({ type: "file_chunk", id: t.id, to: nick, seq: s.seq, data: toBase64(bytes) });
        s.seq += 1; offset += bytes.length;
        t.bar.hidden = false; t.bar.value = offset;
        if (!bytes.length) break;
      } while (offset < t.size);
      sendNow({ type: "file_done", id: t.id, to: nick });
    } catch (err) {
      t.results.set(nick, String(err.message || err));
      outgoingSummary(t);
    }
  }
  function acceptFile(t) {
    if (t.state !== "offered") return;
    t.state = "receiving";
    t.hash = (window.crypto && crypto.subtle && window.isSecureContext) ? null : new Sha256();
    t.actions.textContent = "";
    t.actions.appendChild(button("Cancel", "", () => { sendNow({ type: "file_cancel", id: t.id }); endIncoming(t, "you cancelled it", true); }));
    t.bar.hidden = false;
    setState(t, "Receiving...");
    sendNow({ type: "file_accept", id: t.id });
  }
  function declineFile(t) {
    if (t.state !== "offered") return;
    t.state = "declined"; t.actions.textContent = "";
    setState(t, "Declined.");
    sendNow({ type: "file_decline", id: t.id });
  }
  function endIncoming(t, why, quiet) {
    if (t.state !== "receiving" && t.state !== "offered") return;
    t.state = "failed"; t.chunks = []; t.actions.textContent = ""; t.bar.hidden = true;
    setState(t, "Not saved: " + why + ".", "bad");
    if (!quiet && why !== "the connection was lost") sendNow({ type: "file_cancel", id: t.id, reason: "receiver failed" });
  }
  async function finishIncoming(t) {
    t.state = "checking";
    setState(t, "Checking the SHA-256...");
    const blob = new Blob(t.chunks, { type: mimeFor(t.name) });
    t.chunks = [];
    let why = "";
    if (blob.size !== t.size) why = "incomplete: " + blob.size + " of " + t.size + " bytes";
    else if ((t.hash ? t.hash.hex() : await sha256Hex(blob)) !== t.sha256.toLowerCase()) why = "the SHA-256 does not match: corrupted on the way";
    sendNow(why ? { type: "file_received", id: t.id, ok: false, reason: why } : { type: "file_received", id: t.id, ok: true });
    t.actions.textContent = "";
    if (why) { t.state = "failed"; setState(t, "Not saved: " + why + ".", "bad"); return; }
    t.state = "done";
    t.bar.value = t.size;
    setState(t, "Received, size and SHA-256 checked.", "ok");
    const url = URL.createObjectURL(blob);
    const save = el("a", "", "Save " + t.name);
    save.href = url; save.download = t.name;
    t.actions.appendChild(save);
    if (IMAGE_TYPES[t.name.split(".").pop().toLowerCase()]) {
      const img = el("img");
      img.alt = t.name; img.src = url;
      t.card.appendChild(img);
    }
  }
  function failTransfers(why) {
    for (const t of S.transfers.values()) {
      if (t.mine) {
        for (const [n, s] of t.streams) { s.stop = true; if (s.wake) s.wake(); if (!t.results.has(n)) t.results.set(n, why); }
        if (t.card) outgoingSummary(t);
      } else {
        endIncoming(t, why, true);
      }
    }
  }
  function listFiles() {
    const rows = Array.from(S.transfers.values()).map((t) => t.id + ": " + t.name + " (" + formatSize(t.size) + ") " +
      (t.mine ? "from you: " + t.fstate.textContent : "from " + t.from + ": " + t.state));
    system(current(), rows.length ? "Files: " + rows.join("; ") : "No files yet.");
  }

  // --- slash commands: names, usage and help come from the server's table
  function command(name) {
    name = name.toLowerCase();
    return TABLE.commands.find((c) => c.name === name || (c.aliases || []).includes(name)) || null;
  }
  function usage(name) { const c = command(name); return c ? ("Usage: /" + c.name + " " + c.args).trim() : ""; }
  function typingCounts(line) {
    const s = line.replace(/^\s+/, "");
    if (!line.trim()) return false;
    if (s.startsWith("//") || !s.startsWith("/")) return true;
    const [name, ...rest] = s.slice(1).split(" ");
    return name.toLowerCase() === "me" && rest.join(" ").trim() !== "";
  }
  function showHelp() {
    const c = current();
    if (!c) return;
    const box = el("div", "msg system");
    box.appendChild(el("div", "", "Commands:"));
    const grid = el("div", "help");
    const rows = TABLE.commands.map((r) => [("/" + r.name + " " + r.args).trim(), r.help]).concat(TABLE.footer || []);
    for (const [u, what] of rows) { grid.appendChild(el("code", "", u)); grid.appendChild(el("span", "", what)); }
    box.appendChild(grid);
    c.lastFrom = null;
    addLine(c, box);
  }
  function listUsers(c) {
    const names = Array.from(c.users.values()).map((u) => u.nick + (u.away !== null ? " (away)" : "") + (S.via.has(key(u.nick)) ? " (on " + S.via.get(key(u.nick)) + ")" : ""));
    system(c, names.length + " in " + c.name + ": " + names.join(", "));
  }
  function joinedRoom(name) { return S.convs.get(roomKey(name)) || null; }
  function request(obj) { enqueue(obj); }
  // Returns an error to show (the line then stays in the box), or "".
  function runLine(line) {
    const c = current();
    if (!c) return "Not connected yet.";
    const t = line.replace(/^\s+/, "");
    if (t.startsWith("//")) { say(t.slice(1), false, c); return ""; }
    if (!t.startsWith("/") || t.trim() === "/") { if (line.trim()) say(line, false, c); return ""; }
    const trimmed = t.trim();
    const space = trimmed.indexOf(" ");
    const name = space < 0 ? trimmed.slice(1) : trimmed.slice(1, space);
    const arg = space < 0 ? "" : trimmed.slice(space + 1).trim();
    const cmd = command(name);
    if (!cmd) return "Unknown command /" + name + ". Type /help for the list.";
    const words = arg.split(/\s+/).filter(Boolean);
    const first = words[0] || "", rest = arg.slice(first.length).trim();
    const room = c.kind === "room" ? c.name : null;
    switch (cmd.name) {
      case "me": if (!arg) return usage("me"); say(arg, true, c); return "";
      case "msg": {
        if (!first) return usage("msg");
        const p = conv("pm", first);
        if (rest) say(rest, false, p);
        show(p.key); return "";
      }
      case "join":
        if (!first) return usage("join");
        if (!/^[#&]/.test(first)) return "Room names start with #, like #dev.";
        if (joinedRoom(first)) { show(joinedRoom(first).key); return ""; }
        S.switchTo = roomKey(first);
        request({ type: "join", room: first }); return "";
      case "room": {
        if (!first) { system(c, "You are talking in " + c.name + "; you are in " + Array.from(S.convs.values()).filter((x) => x.kind === "room").map((x) => x.name).join(", ") + "."); return ""; }
        const r = joinedRoom(first);
        if (!r) return "You are not in " + first + "; /join it first.";
        show(r.key); return "";
      }
      case "part":
        if (c.kind === "pm" && !arg) { closeConv(c); return ""; }
        if (/^[#&]/.test(first)) request(Object.assign({ type: "part", room: first }, rest ? { reason: rest } : {}));
        else if (room) request(Object.assign({ type: "part", room }, arg ? { reason: arg } : {}));
        else return "Name the room to leave: /part #ROOM.";
        return "";
      case "close":
        if (c.kind !== "pm") return "/close closes a private conversation; use /part to leave a room.";
        closeConv(c); return "";
      case "rooms": request({ type: "rooms" }); return "";
      case "who":
        if (!room) return "This is a private conversation with " + c.name + ".";
        S.showUsers = c.key; request({ type: "users", room }); return "";
      case "topic":
        if (!room) return "Topics belong to rooms; this is a private conversation.";
        S.askedTopic = c.key;
        request(Object.assign({ type: "topic", room }, arg ? { topic: arg } : {})); return "";
      case "nick": if (!first) return usage("nick"); request({ type: "nick", nick: first }); return "";
      case "away": S.away = arg; request({ type: "away", message: arg }); return "";
      case "back": S.away = null; request({ type: "back" }); return "";
      case "send":
        S.sendTo = first ? conv("pm", first) : c;
        $("file").click(); return "";
      case "accept": case "decline": case "cancel": {
        const tr = S.transfers.get(first);
        if (!first) return usage(cmd.name) + " (/files lists them)";
        if (!tr) return "No file " + first + " (/files lists them).";
        if (cmd.name === "accept") acceptFile(tr);
        else if (cmd.name === "decline") declineFile(tr);
        else sendNow({ type: "file_cancel", id: tr.id });
        return "";
      }
      case "files": listFiles(); return "";
      case "ignore": case "unignore":
        if (!first) {
          if (cmd.name === "unignore") return usage("unignore");
          system(c, S.ignored.size ? "Hidden: " + Array.from(S.ignored).join(", ") : "Nobody is hidden."); return "";
        }
        if (cmd.name === "ignore") S.ignored.add(key(first)); else S.ignored.delete(key(first));
        store.set("ignored", Array.from(S.ignored));
        system(c, cmd.name === "ignore" ? "Hiding " + first + " (saved in this browser)." : "Showing " + first + " again."); return "";
      case "op": if (!arg) return usage("op"); request({ type: "op", password: arg }); return "";
      case "kick": case "mute":
        if (!first) return usage(cmd.name);
        request(Object.assign({ type: cmd.name, nick: first }, rest ? { reason: rest } : {})); return "";
      case "ban": {
        if (!first) return usage("ban");
        const minutes = rest ? Number(rest) : 0;
        if (rest && !(minutes > 0)) return usage("ban") + " (MINUTES is a number)";
        request(Object.assign({ type: "ban", nick: first }, minutes ? { minutes } : {})); return "";
      }
      case "unban": case "unmute": case "whois": if (!first) return usage(cmd.name); request({ type: cmd.name, nick: first }); return "";
      case "stats": request({ type: "stats" }); return "";
      case "help": showHelp(); return "";
      case "quit":
        S.wanted = false;
        store.set("nick", "");  // a shared laptop's next pupil starts at the form
        sendNow(Object.assign({ type: "quit" }, arg ? { reason: arg } : {}));
        if (S.ws) S.ws.close();
        setStatus("You left the chat.", true);
        showLogin("You left the chat. Join again whenever you like.");
        return "";
      default: return "/" + cmd.name + " is not available here.";
    }
  }

  // --- the connect form
  function loginError(text) { $("login-error").textContent = text || ""; }
  function showLogin(text) {
    $("chat").hidden = true; $("login").hidden = false;
    $("login-join").disabled = false;
    loginError(text);
  }
  $("login-server").textContent = "on " + location.host;
  $("login-nick").value = S.nick;
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const nick = $("login-nick").value.trim();
    if (!nick) { loginError("Choose a nick."); return; }
    S.nick = nick;
    if (!$("login-password-row").hidden) S.password = $("login-password").value;
    S.wanted = true; S.fatal = false;
    loginError("Connecting...");
    if ("Notification" in window && Notification.permission === "default") {
      try { Notification.requestPermission().catch(() => {}); } catch { /* old Safari: callback form only */ }
    }
    if (S.ws && S.ws.readyState === WebSocket.OPEN && !S.registered) sendNow(hello());
    else { S.backoff = BACKOFF_START; connect(); }
  });

  // --- the composer
  const input = $("input");
  function grow() { input.style.height = "auto"; input.style.height = Math.min(input.scrollHeight + 2, window.innerHeight * 0.4) + "px"; }
  const sent = [];
  let recall = -1;
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submitLine(); });
  function submitLine() {
    const line = input.value;
    if (!line.trim()) return;
    const problem = runLine(line);
    if (problem) { system(current(), problem, "error"); return; }
    sent.push(line); recall = -1;
    input.value = ""; grow();
    S.lastTyping = 0;
  }
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submitLine(); }
    else if (e.key === "ArrowUp" && input.selectionStart === 0 && sent.length && !input.value.includes("\n")) {
      e.preventDefault(); recall = recall < 0 ? sent.length - 1 : Math.max(0, recall - 1); input.value = sent[recall];
    } else if (e.key === "Tab" && !e.shiftKey) {
      const c = current();
      const m = /(^|\s)(\S+)$/.exec(input.value.slice(0, input.selectionStart));
      if (!c || !m || c.kind !== "room") return;
      const hit = Array.from(c.users.values()).map((u) => u.nick).find((n) => key(n).startsWith(key(m[2])) && key(n) !== key(S.nick));
      if (!hit) return;
      e.preventDefault();
      const before = input.value.slice(0, input.selectionStart - m[2].length);
      const after = input.value.slice(input.selectionStart);
      const word = hit + (before.trim() ? " " : ": ");
      input.value = before + word + after;
      input.selectionStart = input.selectionEnd = (before + word).length;
    }
  });
  input.addEventListener("input", () => {
    grow();
    const c = current();
    const now = Date.now();
    if (c && c.kind === "room" && S.registered && typingCounts(input.value) && now - S.lastTyping >= TYPING_EVERY) {
      S.lastTyping = now;
      sendNow({ type: "typing", room: c.name });
    }
  });

  // --- the drawer, conversations and people
  $("menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("drawer-open");
    $("menu").setAttribute("aria-expanded", String(open));
  });
  $("backdrop").addEventListener("click", () => { document.body.classList.remove("drawer-open"); $("menu").setAttribute("aria-expanded", "false"); });
  $("convs").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-conv]");
    if (b && S.convs.has(b.dataset.conv)) show(b.dataset.conv);
  });
  $("people").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-nick]");
    if (b && key(b.dataset.nick) !== key(S.nick)) show(conv("pm", b.dataset.nick).key);
  });
  function renderSound() {
    $("sound").textContent = S.sound ? "\u{1F514}" : "\u{1F515}";
    $("sound").setAttribute("aria-pressed", String(S.sound));
    $("sound").setAttribute("aria-label", S.sound ? "Sound on" : "Muted");
    $("sound").title = S.sound ? "Sound on (click to mute)" : "Muted (click for sound)";
  }
  $("sound").addEventListener("click", () => { S.sound = !S.sound; store.set("sound", S.sound); renderSound(); });
  renderSound();
  document.addEventListener("visibilitychange", () => {
    const c = current();
    if (document.hidden) {
      if (c && c.marker) { c.marker.remove(); c.marker = null; }
    } else {
      if (c) { c.unread = 0; c.mention = false; renderConvs(); }
      updateTitle();
      reconnectNow();
    }
  });
  window.addEventListener("online", reconnectNow);

  // --- files: the paperclip, /send, drag and drop
  $("attach").addEventListener("click", () => { S.sendTo = current(); $("file").click(); });
  $("file").addEventListener("change", () => {
    const target = S.sendTo || current();
    for (const f of Array.from($("file").files)) offerFile(f, target);
    $("file").value = ""; S.sendTo = null;
  });
  let dragDepth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFiles(e) && S.registered) { dragDepth += 1; $("drop").hidden = false; } });
  document.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) $("drop").hidden = true; });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0; $("drop").hidden = true;
    if (!S.registered) return;
    for (const f of Array.from(e.dataTransfer.files)) offerFile(f, current());
  });

  // --- the emoji picker: tabs per group, Recent, search by name
  const GROUPS = EMOJI.map(([name, items]) => [name, items.split("|").map((s) => {
    const at = s.indexOf(" ");
    return { ch: s.slice(0, at), name: s.slice(at + 1) };
  })]);
  let emojiTab = store.get("recent-emoji", []).length ? "Recent" : GROUPS[0][0];
  function emojiItems(tab) {
    if (tab === "Recent") return store.get("recent-emoji", []).map((ch) => ({ ch, name: "recent" }));
    const g = GROUPS.find(([n]) => n === tab);
    return g ? g[1] : [];
  }
  function renderEmoji() {
    const q = $("emoji-search").value.trim().toLowerCase();
    const tabs = $("emoji-tabs");
    tabs.textContent = "";
    for (const [n, items] of [["Recent", [{ ch: "\u{1F552}" }]]].concat(GROUPS)) {
      const b = el("button", "", items[0].ch);
      b.type = "button"; b.dataset.tab = n; b.title = n;
      b.setAttribute("role", "tab"); b.setAttribute("aria-label", n);
      b.setAttribute("aria-selected", String(!q && n === emojiTab));
      tabs.appendChild(b);
    }
    const grid = $("emoji-grid");
    grid.textContent = "";
    const words = q.split(/\s+/).filter(Boolean);
    const items = q ? GROUPS.flatMap(([, list]) => list).filter((it) => words.every((w) => it.name.includes(w))) : emojiItems(emojiTab);
    for (const it of items.slice(0, 400)) {
      const b = el("button", "", it.ch);
      b.type = "button"; b.dataset.emoji = it.ch; b.title = it.name; b.setAttribute("aria-label", it.name);
      grid.appendChild(b);
    }
    if (!items.length) grid.appendChild(el("p", "", q ? "No emoji called that." : "Emoji you pick show up here."));
  }
  function openEmoji(open) {
    $("emoji-panel").hidden = !open;
    $("emoji").setAttribute("aria-expanded", String(open));
    if (open) { $("emoji-search").value = ""; renderEmoji(); $("emoji-search").focus(); }
  }
  function pickEmoji(ch) {
    const at = input.selectionStart, end = input.selectionEnd;
    input.value = input.value.slice(0, at) + ch + input.value.slice(end);
    input.selectionStart = input.selectionEnd = at + ch.length;
    store.set("recent-emoji", [ch].concat(store.get("recent-emoji", []).filter((x) => x !== ch)).slice(0, 24));
    openEmoji(false);
    input.focus();
  }
  $("emoji").addEventListener("click", () => openEmoji($("emoji-panel").hidden));
  $("emoji-search").addEventListener("input", renderEmoji);
  $("emoji-search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); const b = $("emoji-grid").querySelector("button"); if (b) pickEmoji(b.dataset.emoji); }
  });
  $("emoji-tabs").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-tab]");
    if (b) { emojiTab = b.dataset.tab; $("emoji-search").value = ""; renderEmoji(); }
  });
  $("emoji-grid").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-emoji]");
    if (b) pickEmoji(b.dataset.emoji);
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("emoji-panel").hidden) { openEmoji(false); input.focus(); } });
  document.addEventListener("pointerdown", (e) => {
    if (!$("emoji-panel").hidden && !$("emoji-panel").contains(e.target) && e.target !== $("emoji")) openEmoji(false);
  });

  // --- start: with a remembered nick, join at once
  if (S.nick && new URLSearchParams(location.search).get("join") !== "0") {
    S.wanted = true;
    loginError("Connecting...");
    connect();
  } else {
    $("login-nick").focus();
  }
})();
"""

# Path -> (Content-Type, a function giving the bytes, or None if there are none).
# Sections below add theirs (the ding, the icon).
WEB_FILES: dict[str, tuple[str, Callable[[], bytes | None]]] = {
    "/": ("text/html; charset=utf-8", lambda: WEB_HTML.encode("utf-8")),
    "/app.css": ("text/css; charset=utf-8", lambda: WEB_CSS.encode("utf-8")),
    "/app.js": ("text/javascript; charset=utf-8", lambda: WEB_JS.encode("utf-8")),
}

_HTTP_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/(1\.[01])")
_HTTP_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_HTTP_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")
_WEB_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")
_WS_KEY = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")  # base64 of 16 bytes
# Headers that may come once only: two of them is how requests are smuggled.
_HTTP_SINGLE = frozenset({"host", "content-length", "transfer-encoding", "origin", "upgrade",
                          "sec-websocket-key", "sec-websocket-version"})


class HttpError(PyChatError):
    """A request the web gateway answers with an error status and a close."""

    def __init__(self, status: int, text: str, **headers: str):
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers


@dataclasses.dataclass
class HttpRequest:
    """A parsed request head: header names lower-cased, their values stripped."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header's tokens, lower-cased (Connection, Upgrade)."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",")}


def parse_http_head(head: bytes) -> HttpRequest:
    """The request line and header lines (without the blank line that ends
    them); HttpError for anything a strict HTTP/1.1 server refuses, above all
    the shapes that make two servers disagree on where a request ends
    (RFC 9112 sections 2.2, 3, 5 and 6.3)."""
    lines = head.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if any(b"\r" in line for line in lines):
        raise HttpError(400, "A bare CR in the request.")
    match = _HTTP_REQUEST_LINE.fullmatch(lines[0])
    if match is None:  # absolute-form targets, non-ASCII, HTTP/2 or /0.9 land here
        raise HttpError(400, "The request line must be METHOD /path HTTP/1.1.")
    if len(lines) - 1 > WEB_MAX_HEADERS:
        raise HttpError(431, f"At most {WEB_MAX_HEADERS} header lines.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "Folded header lines are not allowed.")
        name, colon, value = line.partition(b":")
        if not colon or not _HTTP_TOKEN.fullmatch(name):
            raise HttpError(400, "A malformed header line.")
        value = value.strip(b" \t")
        if not _HTTP_VALUE.fullmatch(value):
            raise HttpError(400, "A header value with control or non-ASCII bytes.")
        key = name.decode("ascii").lower()
        if key in headers:
            if key in _HTTP_SINGLE:
                raise HttpError(400, f"More than one {name.decode('ascii')} header.")
            headers[key] += ", " + value.decode("ascii")
        else:
            headers[key] = value.decode("ascii")
    if "transfer-encoding" in headers:  # with or without Content-Length: no bodies here
        raise HttpError(400, "Transfer-Encoding is not accepted.")
    if not headers.get("content-length", "0").isdigit():
        raise HttpError(400, "A malformed Content-Length.")
    if "host" not in headers:
        raise HttpError(400, "No Host header.")
    method, target, version = (g.decode("ascii") for g in match.groups())
    return HttpRequest(method, target, version, headers)


def split_host(host: str, default_port: int) -> tuple[str, int] | None:
    """'Example.org:80' -> ('example.org', 80); None if it is no host[:port]."""
    match = _HTTP_HOST.fullmatch(host.lower())
    if match is None or not match.group(1).strip(".-"):
        return None
    return match.group(1), int(match.group(2) or default_port)


def web_origin(origin: str) -> tuple[str, str, int] | None:
    """'https://Example.org' -> ('https', 'example.org', 443); None if it is
    not an http(s) origin ("null", a path, user info...)."""
    match = _WEB_ORIGIN.fullmatch(origin.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    return scheme, host, int(port or (443 if scheme == "https" else 80))


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# Suffixes home routers and mDNS give a machine's name.  Only these: a name
# like "raspberrypi.evil.example" must not pass for this machine's.
LAN_SUFFIXES = ("", ".local", ".lan", ".home", ".home.arpa", ".localdomain", ".internal")


def own_host_names() -> set[str]:
    """The names a browser may use for this machine: localhost and its host
    name, bare or with a LAN suffix (no DNS lookup: that can hang)."""
    full = socket.gethostname().lower()
    short = full.split(".")[0]
    names = {"localhost", full} | {short + suffix for suffix in LAN_SUFFIXES if short}
    return names - {""}


def ws_accept(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One whole server frame (FIN set, never masked)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def ws_close_frame(code: int, reason: str = "") -> bytes:
    """A close frame: its code and at most 123 bytes of reason (whole characters)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return ws_frame(WS_CLOSE, struct.pack("!H", code) + text)


def ws_unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR a client frame's payload with its 4-byte mask, as one big integer
    (C speed: a byte-by-byte loop is 50 times slower)."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class HttpWire(Wire):
    """The HTTP side of one connection, until it is answered (one response,
    then the connection closes) or upgraded to a WebSocket (WebWire)."""

    native = False
    joins_lobby = False
    json_requests = False
    byte_stream = True
    linger = True

    def __init__(self, server: ChatServer, session: Session):
        super().__init__(server, session)
        self.buf = bytearray()
        self.answered = False
        self.head_only = False         # a HEAD request: no body, errors included
        # The whole head must be here this long after connecting: a peer that
        # sends it a byte at a time holds a connection no longer than this.
        delay = session.connected_at + server.cfg.web_head_timeout - server.loop.time()
        self.timer: asyncio.TimerHandle | None = server.loop.call_later(max(0.0, delay),
                                                                        self.too_slow)

    @classmethod
    def claims(cls, server: ChatServer, line: bytes) -> bool:
        method, space, _ = line.partition(b" ")
        return bool(space) and method in HTTP_METHODS and server.cfg.web

    # --- input
    def receive(self, line: bytes) -> None:
        """The request line, when it picked this wire: parsed with the rest."""
        self.data(line + b"\r\n")

    def data(self, data: bytes) -> None:
        if self.answered:
            return  # a response is on its way; what else comes is not read
        self.buf += data
        buf = self.buf
        end = buf.find(b"\n\r\n")
        end2 = buf.find(b"\n\n")
        ends = [e for e in (end, end2) if e >= 0]
        first = buf.find(b"\n")
        if (first < 0 and len(buf) > WEB_MAX_HEAD) or first > WEB_MAX_HEAD:
            self.fail(HttpError(414, "The request line is too long."))
            return
        if first >= 0 and not _HTTP_REQUEST_LINE.fullmatch(buf[:first].rstrip(b"\r")):
            self.fail(HttpError(400, "The request line must be METHOD /path HTTP/1.1."))
            return
        if not ends:
            if len(buf) > WEB_MAX_HEAD:
                self.fail(HttpError(431, "The request head is too large."))
            elif buf.count(b"\n") > WEB_MAX_HEADERS + 1:
                self.fail(HttpError(431, f"At most {WEB_MAX_HEADERS} header lines."))
            return
        cut = min(ends)  # the newline that ends the last header line
        head, rest = bytes(buf[:cut]), bytes(buf[cut + (3 if cut == end else 2):])
        if len(head) > WEB_MAX_HEAD:
            self.fail(HttpError(431, "The request head is too large."))
            return
        self.buf = bytearray()
        try:
            request = parse_http_head(head[:-1] if head.endswith(b"\r") else head)
            self.route(request, rest)
        except HttpError as e:
            self.fail(e)

    # --- answers
    def route(self, request: HttpRequest, rest: bytes) -> None:
        head_only = self.head_only = request.method == "HEAD"
        host = self.check_host(request)
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, "Only GET and HEAD.", Allow="GET, HEAD")
        if request.headers.get("content-length", "0") != "0":
            raise HttpError(400, "No request bodies here.")
        if request.path == "/ws" and not head_only:
            self.upgrade(request, host, rest)
            return
        if request.path == "/ws":
            raise HttpError(400, "A WebSocket is opened with GET.")
        entry = WEB_FILES.get(request.path)
        body = entry[1]() if entry is not None else None
        if entry is None or body is None:
            raise HttpError(404, "Not found.")
        self.respond(200, body, entry[0], head_only, host)

    def check_host(self, request: HttpRequest) -> str:
        """The Host, if this server answers to it: an IP address, localhost,
        this machine's name, or a --web-origin's host (never a name that an
        outside page could point here: DNS rebinding)."""
        split = split_host(request.headers["host"], 443 if self.tls else 80)
        if split is None:
            raise HttpError(400, "A malformed Host header.")
        name = split[0]
        allowed = {o[1] for o in map(web_origin, self.server.cfg.web_origins) if o}
        if not (is_ip_literal(name) or name.rstrip(".") in own_host_names() or name in allowed):
            raise HttpError(403, f"This server does not answer to the name {name}; "
                            "start it with --web-origin to allow one.")
        return request.headers["host"]

    @property
    def tls(self) -> bool:
        return self.server.cfg.ssl_context is not None

    def security_headers(self, host: str | None) -> list[tuple[str, str]]:
        """Sent with every response, errors included."""
        connect = "'self'"
        if host is not None:  # older Safari does not count ws:// of the same host as 'self'
            connect += f" {'wss' if self.tls else 'ws'}://{host}"
        return [("Content-Security-Policy",
                 "default-src 'self'; script-src 'self'; style-src 'self'; "
                 "img-src 'self' blob: data:; media-src 'self' blob: data:; "
                 f"connect-src {connect}; object-src 'none'; base-uri 'none'; "
                 "form-action 'self'; frame-ancestors 'none'"),
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"),
                ("X-Frame-Options", "DENY"),
                ("Cross-Origin-Resource-Policy", "same-origin"),
                ("Cache-Control", "no-store")]

    def respond(self, status: int, body: bytes, content_type: str, head_only: bool = False,
                host: str | None = None, extra: Mapping[str, str] | None = None) -> None:
        """Send one whole response, then close (after the peer has read it)."""
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   *self.security_headers(host), *(extra or {}).items(),
                   ("Connection", "close")]
        self.send_head(status, headers)
        if not head_only:
            self.s.send(body)
        self.s.close("http")  # (lingering: see Session.close)

    def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        phrase = http.HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers), "", ""]
        self.s.send("\r\n".join(lines).encode("ascii"))

    def fail(self, e: HttpError) -> None:
        self.server.log(self.s, logging.INFO, "%s: HTTP %d: %s", self.s.peer, e.status, e.text)
        self.respond(e.status, (e.text + "\n").encode("utf-8"), "text/plain; charset=utf-8",
                     self.head_only, extra=e.headers)

    def too_slow(self) -> None:
        self.timer = None
        if not self.answered and not self.s.closing:
            self.server.note_trouble("slow-http", f"{self.s.peer}: no request head in time")
            self.fail(HttpError(408, "The request took too long."))

    def tell(self, event: dict) -> None:
        """The core speaks to an HTTP peer only to refuse it or time it out."""
        if event.get("type") != "error" or self.answered:
            return
        status = {"banned": 403, "not_registered": 408}.get(event.get("code", ""), 503)
        self.fail(HttpError(status, str(event.get("message", "Refused."))))

    def render(self, event: dict) -> Any:
        return None  # never in a room

    def take(self, event: dict, rendered: Any) -> None:
        pass

    # --- the WebSocket handshake (RFC 6455 4.2)
    def upgrade(self, request: HttpRequest, host: str, rest: bytes) -> None:
        if request.version != "1.1" or "websocket" not in request.tokens("upgrade") or \
                "upgrade" not in request.tokens("connection"):
            raise HttpError(400, "GET /ws must be a WebSocket upgrade.")
        if request.headers.get("sec-websocket-version") != "13":
            raise HttpError(426, "WebSocket version 13 only.", **{"Sec-WebSocket-Version": "13"})
        key = request.headers.get("sec-websocket-key", "")
        if not _WS_KEY.fullmatch(key):
            raise HttpError(400, "A malformed Sec-WebSocket-Key.")
        origin = request.headers.get("origin")
        if origin is not None and not self.same_origin(origin, host):
            raise HttpError(403, "A WebSocket from another site's page.")
        self.send_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                             ("Sec-WebSocket-Accept", ws_accept(key)),
                             *self.security_headers(host)])
        self.s.wire = wire = WebWire(self.server, self.s)
        self.server.log(self.s, logging.DEBUG, "%s: WebSocket open", self.s.peer)
        if rest:
            wire.data(rest)

    def same_origin(self, origin: str, host: str) -> bool:
        """The page that opens the socket came from this server (or from a
        --web-origin, such as a reverse proxy's address)."""
        theirs = web_origin(origin)
        if theirs is None:
            return False  # "null" (a file, a sandbox) or garbage
        if theirs in {web_origin(o) for o in self.server.cfg.web_origins}:
            return True
        scheme = "https" if self.tls else "http"
        return theirs == (scheme, *split_host(host, 443 if self.tls else 80))  # type: ignore


class WebWire(Wire):
    """A WebSocket member: client frames in, protocol v1 requests to the core;
    the core's events out, one unmasked text frame each."""

    native = False
    byte_stream = True  # json_requests stays True: the core parses the messages
    linger = True       # the close frame must be read (RFC 6455 7.1.1: the server closes first)

    def __init__(self, server: ChatServer, session: Session):
        super().__init__(server, session)
        self.buf = bytearray()
        self.parts: list[bytes] = []   # a fragmented message so far
        self.part_bytes = 0
        self.in_message = False        # a fragmented message is in progress
        self.close_sent = False

    # --- events from the core
    def tell(self, event: dict) -> None:
        if event.get("type") == "ping":  # keepalive: browsers answer a ping frame themselves
            self.s.send(ws_frame(WS_PING, b"keepalive"))
        else:
            self.s.send(ws_frame(WS_TEXT, encode(event)[:-1]))

    def render(self, event: dict) -> bytes:
        return ws_frame(WS_TEXT, encode(event)[:-1])

    def goodbye(self, reason: str) -> None:
        if not self.close_sent:
            self.close_sent = True
            self.s.send(ws_close_frame(WS_CLOSE_CODES.get(reason, WS_POLICY), reason))

    # --- frames from the client (RFC 6455 5.2)
    def data(self, data: bytes) -> None:
        s, limit = self.s, self.server.cfg.max_line_bytes
        if s.closing:
            return  # closed: the rest is not read
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while not s.closing and end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, n, head = b0 & 0x0F, b1 & 0x7F, 2
            if b0 & 0x70:
                self.fail(WS_PROTOCOL_ERROR, "reserved bits set")
                return
            if not b1 & 0x80:
                self.fail(WS_PROTOCOL_ERROR, "client frames must be masked")
                return
            if n == 126:
                if end - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            problem = self.frame_problem(opcode, bool(b0 & 0x80), n, limit)
            if problem:
                self.fail(*problem)
                return
            size = head + 4 + n
            if end - pos < size:
                break  # (at most a message's limit is ever waited for)
            payload = ws_unmask(buf[pos + head + 4:pos + size], buf[pos + head:pos + head + 4])
            pos += size
            if opcode >= WS_CLOSE:
                self.control(opcode, payload)
            elif b0 & 0x80 and not self.in_message:
                self.message(payload)
            else:
                self.in_message = True
                self.parts.append(payload)
                self.part_bytes += n
                if b0 & 0x80:
                    whole = b"".join(self.parts)
                    self.parts, self.part_bytes, self.in_message = [], 0, False
                    self.message(whole)
        if not s.closing:
            del buf[:pos]

    def frame_problem(self, opcode: int, fin: bool, n: int,
                      limit: int) -> tuple[int, str] | None:
        """Why a frame with this header ends the connection, if it does."""
        if opcode >= WS_CLOSE:
            if opcode > WS_PONG:
                return WS_PROTOCOL_ERROR, "unknown opcode"
            if n > 125 or not fin:
                return WS_PROTOCOL_ERROR, "control frames are short and whole"
            return None
        if opcode == WS_CONTINUATION and not self.in_message:
            return WS_PROTOCOL_ERROR, "continuation without a message"
        if opcode != WS_CONTINUATION and self.in_message:
            return WS_PROTOCOL_ERROR, "a new message inside a fragmented one"
        if opcode == WS_BINARY:
            return WS_UNSUPPORTED, "protocol v1 is text: JSON"
        if opcode != WS_TEXT and opcode != WS_CONTINUATION:
            return WS_PROTOCOL_ERROR, "unknown opcode"
        if self.part_bytes + n > limit:
            return WS_TOO_BIG, f"messages are limited to {limit} bytes"
        return None

    def message(self, payload: bytes) -> None:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(WS_BAD_DATA, "text messages must be UTF-8")
            return
        self.server.handle_line(self.s, payload)

    def control(self, opcode: int, payload: bytes) -> None:
        if opcode == WS_PING:
            if self.server._take_token(self.s):  # a ping costs a token like any request
                self.s.send(ws_frame(WS_PONG, payload))
        elif opcode == WS_CLOSE:  # echo the code, then close
            if len(payload) == 1 or (payload and int.from_bytes(payload[:2], "big")
                                     not in WS_PEER_CODES):
                self.fail(WS_PROTOCOL_ERROR, "a malformed close frame")
                return
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(WS_BAD_DATA, "a close reason must be UTF-8")
                return
            self.close_sent = True
            self.s.send(ws_frame(WS_CLOSE, payload[:2]))
            self.s.close("disconnected")
        # a pong: only proof of life, which data_received has noted

    def fail(self, code: int, why: str) -> None:
        """Fail the WebSocket connection (RFC 6455 7.1.7): say why, close."""
        self.server.log(self.s, logging.INFO, "%s (%s): WebSocket %d: %s",
                        self.s.nick or "unregistered", self.s.peer, code, why)
        self.close_sent = True
        self.s.send(ws_close_frame(code, why))
        self.s.close("line_too_long" if code == WS_TOO_BIG else "protocol_error")


def web_links(host: str | None, port: int, tls: bool) -> list[str]:
    """The addresses to open in a browser: every LAN address this machine's
    name has when listening on all interfaces (found without sending a
    packet), else the one listened on."""
    if host in (None, "", "0.0.0.0", "::"):
        hosts = lan_addresses() or [socket.gethostname() or "localhost"]
    else:
        hosts = [host]
    scheme = "https" if tls else "http"
    return [f"{scheme}://[{h}]:{port}" if ":" in h else f"{scheme}://{h}:{port}" for h in hosts]


ChatServer.first_line_wires.append(HttpWire)  # before IRC, which takes every other line
ChatServer.web_wire = HttpWire


# ===========================================================================
# 3d. LAN discovery -- a server answers "who is there?" datagrams on UDP
#     DISCOVERY_PORT, sent to IPv4 broadcast or IPv6 link-local multicast;
#     find_servers() asks and, when nobody answers, says what it tried and
#     the likely reasons.  `find` prints what it finds; `cli` and `gui` ask
#     when no --host is given.  Uses: constants, protocol.
#
# A query is padded to DISCOVERY_QUERY_BYTES and an answer is never longer
# than the query it answers, so a spoofed source gains an attacker nothing;
# answers are rate-limited per source address and in all.  An answer says
# where to connect and what to expect (TLS and its certificate's SHA-256,
# a password or not), never anything secret.
# ===========================================================================

def spend(bucket: list[float], now: float, burst: float, rate: float) -> bool:
    """Token bucket [tokens, last time]: refill by the time passed, then take
    one if there is one."""
    bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rate)
    bucket[1] = now
    if bucket[0] < 1:
        return False
    bucket[0] -= 1
    return True


def _compact(obj: dict) -> bytes:
    """A datagram: the protocol's encoding of one object, without its newline."""
    return encode(obj)[:-1]


def discovery_query(qid: str) -> bytes:
    """A query, padded to DISCOVERY_QUERY_BYTES (what an answer may be at most)."""
    query = {"pychat": "find", "v": 1, "id": qid, "pad": ""}
    query["pad"] = "." * max(0, DISCOVERY_QUERY_BYTES - len(_compact(query)))
    return _compact(query)


def _datagram_json(data: bytes) -> dict | None:
    """A datagram as a JSON object; None for anything else (never raises)."""
    if len(data) > 2 * DISCOVERY_QUERY_BYTES:
        return None
    try:  # the protocol's own decoder: no key twice, no NaN
        obj = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class DiscoveryRates:
    """How many answers each source may still get, and everyone together
    (shared by a server's IPv4 and IPv6 sockets)."""

    def __init__(self) -> None:
        self.sources: dict[str, list[float]] = {}  # address -> bucket, oldest first
        self.everyone = [float(DISCOVERY_ANSWERS_PER_SECOND), 0.0]
        self.answered = 0

    def allowed(self, source: str) -> bool:
        now = time.monotonic()
        bucket = self.sources.pop(source, None) or [float(DISCOVERY_BURST), now]
        self.sources[source] = bucket  # the most recent last
        if len(self.sources) > DISCOVERY_SOURCES:
            del self.sources[next(iter(self.sources))]
        return spend(bucket, now, DISCOVERY_BURST, DISCOVERY_RATE) and \
            spend(self.everyone, now, DISCOVERY_ANSWERS_PER_SECOND, DISCOVERY_ANSWERS_PER_SECOND)


class Announcer(asyncio.DatagramProtocol):
    """The server's side, one per socket: answers each well-formed query,
    within the rates."""

    def __init__(self, server: ChatServer, rates: DiscoveryRates):
        self.server = server
        self.rates = rates
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = _datagram_json(data)
        if query is None or query.get("pychat") != "find" or not isinstance(query.get("id"), str) \
                or not re.fullmatch(r"[!-~]{1,32}", query["id"]):  # (a finder's ids are hex)
            return
        if not self.rates.allowed(str(addr[0])):
            return
        answer = _compact(self.server.announcement(query["id"]))
        if len(answer) <= len(data) and self.transport is not None:
            self.transport.sendto(answer, addr)
            self.rates.answered += 1

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an earlier answer: nothing to do


def _discovery_sockets(host: str | None, port: int) -> list[socket.socket]:
    """UDP sockets to answer on: the loopback address a loopback-only server
    listens on, else every interface (IPv4, and IPv6 joined to the group on
    each interface).  Several servers on one machine can share the port."""
    loopback = host in ("localhost", "127.0.0.1", "::1")
    wanted = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)] if loopback \
        else [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    if host == "localhost":
        wanted = [(socket.AF_INET, "127.0.0.1")]
    made = []
    for family, address in wanted:
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:  # no IPv6 on this machine: IPv4 alone
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):  # Linux, macOS: all get the broadcasts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            if family == socket.AF_INET6 and not loopback:
                group = socket.inet_pton(socket.AF_INET6, DISCOVERY_GROUP)
                for index, _name in _interfaces():
                    try:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                        group + struct.pack("@I", index))
                    except OSError:
                        pass  # an interface without multicast (loopback)
            sock.setblocking(False)
            made.append(sock)
        except OSError as e:
            sock.close()
            if family == socket.AF_INET or not made:
                for other in made:
                    other.close()
                raise OSError(e.errno, f"UDP port {port}: {e.strerror or e}") from None
    return made


def _interfaces() -> list[tuple[int, str]]:
    try:
        return socket.if_nameindex()
    except (OSError, AttributeError):  # no interface list on this system
        return []


async def start_announcer(server: ChatServer, host: str | None) -> list[int]:
    """Answer discovery for `server` (ServerConfig.announce_port); the UDP
    ports it answers on (none when the port cannot be had: a warning, not
    an error, since everything else works without it)."""
    try:
        socks = _discovery_sockets(host, server.cfg.announce_port or 0)
    except OSError as e:
        log.warning("LAN discovery is off: %s", e.strerror or e)
        return []
    rates = server.discovery_rates = DiscoveryRates()
    for sock in socks:
        transport, _ = await server.loop.create_datagram_endpoint(
            lambda: Announcer(server, rates), sock=sock)
        server.datagram_transports.append(transport)
    return sorted({s.getsockname()[1] for s in socks})


@dataclasses.dataclass
class FoundServer:
    """One server that answered: where it is and what it said of itself."""
    name: str
    host: str
    port: int
    users: int
    tls: bool
    fingerprint: str | None
    password: bool
    version: str
    instance: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_answer(cls, answer: dict, host: str) -> FoundServer | None:
        """An answer's fields, checked; None if any is missing or wrong."""
        fp = answer.get("fingerprint")
        fields = (answer.get("name"), answer.get("port"), answer.get("users"),
                  answer.get("version"), answer.get("instance"))
        if not (isinstance(fields[0], str) and type(fields[1]) is int and
                0 < fields[1] < 65536 and type(fields[2]) is int and fields[2] >= 0 and
                isinstance(fields[3], str) and isinstance(fields[4], str) and
                isinstance(answer.get("tls"), bool) and isinstance(answer.get("password"), bool)
                and (fp is None or (isinstance(fp, str) and re.fullmatch("[0-9a-f]{64}", fp)))):
            return None
        return cls(name=_shown(fields[0], 64) or "?", host=host, port=fields[1],
                   users=fields[2], tls=answer["tls"], fingerprint=fp,
                   password=answer["password"], version=_shown(fields[3], 20),
                   instance=fields[4][:32])


def _shown(text: str, limit: int) -> str:
    """Another machine's words on one line: no line breaks, tabs, control,
    format (bidi) or lone surrogate characters, at most `limit` long."""
    kept = "".join(ch for ch in text if unicodedata.category(ch) not in
                   ("Cc", "Cf", "Cs", "Zl", "Zp") or ch in "\t\n")
    return " ".join(kept.split())[:limit]


@dataclasses.dataclass
class FindResult:
    """What find_servers() found, where it asked, and what failed."""
    servers: list[FoundServer]
    asked: list[str]
    failed: list[str]
    seconds: float

    def explain(self) -> str:
        """Why nothing answered, as a user would want it: what was tried and
        the likely causes, most likely first."""
        lines = [f"No PyChat server answered within {self.seconds:g} s."]
        if self.asked:
            lines.append("Asked: " + "; ".join(self.asked) + ".")
        if self.failed:
            lines.append("Could not ask: " + "; ".join(self.failed) + ".")
        if not self.asked:
            lines.append("This machine has no network to ask on (is it connected?).")
        lines += ["Likely causes:",
                  "- no server is running on this network (servers answer unless started "
                  "with --no-announce);",
                  f"- a firewall on the server's machine drops UDP port {DISCOVERY_PORT} "
                  "(allow it there, or type the address);",
                  "- the server is on a different subnet: discovery does not cross routers;",
                  "- the Wi-Fi keeps its clients apart (client isolation, common on guest "
                  "networks)."]
        return "\n".join(lines)


def _find_targets(at: list[str] | None, port: int) -> list[tuple[int, tuple]]:
    """Where to send the query: the given addresses (ADDR, ADDR:PORT or
    [IPv6]:PORT), or IPv4 broadcast, this machine, and the IPv6 group on
    every interface."""
    if at:
        targets = []
        for spec in at:
            m = re.fullmatch(r"\[(.+)\](?::(\d+))?|([^:]+)(?::(\d+))?|(.+)", spec.strip())
            if m is None:
                continue
            host = m.group(1) or m.group(3) or m.group(5)
            num = m.group(2) or m.group(4)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            targets.append((family, (host, int(num) if num else port)))  # (bad ports: failed)
        return targets
    targets = [(socket.AF_INET, ("255.255.255.255", port)), (socket.AF_INET, ("127.0.0.1", port)),
               (socket.AF_INET6, ("::1", port))]
    for index, _name in _interfaces():
        targets.append((socket.AF_INET6, (DISCOVERY_GROUP, port, 0, index)))
    return targets


def _describe(family: int, target: tuple) -> str:
    if family == socket.AF_INET6 and len(target) == 4 and target[3]:
        name = dict(_interfaces()).get(target[3], str(target[3]))
        return f"IPv6 multicast [{target[0]}]:{target[1]} on {name}"
    if target[0] == "255.255.255.255":
        return f"IPv4 broadcast {target[0]}:{target[1]}"
    return f"{'[' + target[0] + ']' if family == socket.AF_INET6 else target[0]}:{target[1]}"


def find_servers(seconds: float = FIND_SECONDS, port: int = DISCOVERY_PORT,
                 at: list[str] | None = None) -> FindResult:
    """Ask the LAN (or the addresses in `at`) who is there and collect the
    answers for `seconds`.
    Blocking: the GUI runs it in a thread."""
    qid = secrets.token_hex(8)
    query = discovery_query(qid)
    socks: dict[int, socket.socket] = {}
    asked, failed = [], []
    for family, target in _find_targets(at, port):
        try:
            if family not in socks:
                sock = socks[family] = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            socks[family].sendto(query, target)
            asked.append(_describe(family, target))
        except (OSError, OverflowError, ValueError, TypeError, UnicodeError) as e:
            if family == socket.AF_INET6 and target[0] == DISCOVERY_GROUP and \
                    getattr(e, "errno", None) in (errno.ENETUNREACH, errno.EADDRNOTAVAIL):
                continue  # an interface without IPv6 multicast (loopback, or down)
            failed.append(f"{_describe(family, target)} ({getattr(e, 'strerror', None) or e})")
    found: dict[str, FoundServer] = {}
    deadline = time.monotonic() + seconds
    while socks and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(socks.values()), [], [], left)
        for sock in ready:
            try:
                data, addr = sock.recvfrom(4 * DISCOVERY_QUERY_BYTES)
            except OSError:
                continue
            answer = _datagram_json(data)
            if answer is None or answer.get("pychat") != "here" or answer.get("id") != qid:
                continue
            host = str(addr[0])
            if len(addr) == 4 and addr[3] and host.startswith("fe80"):
                host = f"{host}%{dict(_interfaces()).get(addr[3], addr[3])}"
            server = FoundServer.from_answer(answer, host)
            if server is not None and len(found) < DISCOVERY_MAX_FOUND:
                key = f"{server.instance}:{server.port}"
                if key not in found or _address_rank(server.host) < \
                        _address_rank(found[key].host):
                    found[key] = server
    for sock in socks.values():
        sock.close()
    servers = sorted(found.values(), key=lambda s: (s.name.lower(), s.address))
    return FindResult(servers, asked, failed, seconds)


def _address_rank(host: str) -> int:
    """Which of a server's addresses to show: a LAN IPv4 one, then loopback,
    then IPv6."""
    return 2 if ":" in host else 1 if host.startswith("127.") else 0


def find_at_from_env() -> list[str] | None:
    """PYCHAT_FIND_AT: addresses to ask instead of broadcasting (comma-separated),
    or "off" for no discovery at all (returned as [])."""
    value = os.environ.get("PYCHAT_FIND_AT", "").strip()
    if not value:
        return None
    return [] if value.lower() == "off" else [v for v in value.split(",") if v.strip()]


# ===========================================================================
# 3e. Server link -- `server --link HUB:PORT`: this server joins an IRC
#     network (ngircd) as a leaf server (RFC 2813), so that its users and
#     the network's see each other.  Uses: constants, protocol, server, 3b.
#
# Someone on another server is a RemoteUser: a member of rooms and of the
# nick table like anyone, with no connection of her own.  What this
# server's users do reaches the network through ChatServer.relay, which
# hands the event to Link.relay, the one place where an event becomes a
# server-link line.  What the network says arrives in the Link.on_<COMMAND>
# handlers, which change rooms and members through the core's own methods
# (publish, presence, rename, kick_out), with events marked "via": the
# server they came from.
#
# The hub is trusted with the network, not with this server: everything it
# can make the leaf hold is capped (remote users, rooms, servers, a line's
# length, unread input), a malformed line is logged now and then and
# skipped, and nothing a user of this server asks for ever becomes a KILL,
# SQUIT or SERVER line.  A leaf only: it never routes between two servers.
# ===========================================================================

NETWORK_ROOMS = "@network"  # who made the rooms the network's channels made here


class LinkWire(Wire):
    """A remote user's wire: she is told only what the network must carry
    to her (a private message); everything else reaches her server from
    the link itself, once per event, not once per member."""

    native = False
    joins_lobby = False
    json_requests = False

    def tell(self, event: dict) -> None:
        link = self.server.link
        if link is None or event.get("type") != "pm" or event.get("to") != self.s.nick:
            return
        sender = self.server.nicks.get(nick_key(str(event.get("from"))))
        if sender is not None and not sender.remote:
            link.relay(sender, event)

    def render(self, event: dict) -> None:
        return None

    def take(self, event: dict, rendered: Any) -> None:
        pass

    def joined(self, room: Room, after: int | None) -> None:
        pass


class RemoteUser(Session):
    """Someone on another server of the network.  She has no connection:
    `closing` is always True, so no write path (send, broadcast, presence)
    ever queues bytes for her, and the hot loop passes her by at once."""

    __slots__ = ("via", "user", "host", "realname")
    remote = True

    def __init__(self, server: ChatServer, nick: str, via: str, user: str, host: str,
                 realname: str):
        super().__init__(server, LinkWire)
        self.closing = True
        self.nick, self.via = nick, via
        self.user, self.host, self.realname = user, host, realname
        self.address = self.subnet = via


def _link_field(text: str, limit: int) -> str:
    """A user name, host or real name from the network, safe to show."""
    return _CONTROL_RE.sub("", clean_text(text)).replace("\n", " ")[:limit] or "?"


def link_options(args: argparse.Namespace) -> dict:
    """ServerConfig's link fields from the command line (PyChatError for
    anything wrong): --link HUB:PORT and the options that go with it."""
    if not args.link:
        if args.link_name or args.link_password_file or args.link_tls or args.link_cafile:
            raise PyChatError("--link-name, --link-password-file, --link-tls and "
                              "--link-cafile go with --link HUB:PORT")
        return {}
    if len(args.link) > 1:
        raise PyChatError("a PyChat server is a leaf of the network: one --link, to its hub "
                          "(the hubs link to each other)")
    host, sep, port = args.link[0].rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PyChatError(f"bad --link {args.link[0]!r}: give the hub as HOST:PORT, such as "
                          "127.0.0.1:6667")
    name = args.link_name or ""
    if not name:
        raise PyChatError("--link needs --link-name: this server's name on the network, as "
                          "in the hub's [Server] Name, such as pychat.example")
    if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", name) or len(name) > 63:
        raise PyChatError("--link-name is a server name with a dot, such as pychat.example "
                          "(letters, digits, dashes and dots; the hub's [Server] Name)")
    try:
        lines = Path(args.link_password_file).read_text(encoding="utf-8").splitlines() \
            if args.link_password_file else [os.environ.get("PYCHAT_LINK_PASSWORD", "")]
    except OSError as e:
        raise PyChatError(f"cannot read --link-password-file: {e.strerror or e}") from None
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        raise PyChatError("the link needs a password: --link-password-file FILE (its first "
                          "line), or PYCHAT_LINK_PASSWORD")
    if any(" " in line for line in lines):
        raise PyChatError("a link password has no spaces (IRC servers cannot send them)")
    tls = None
    if args.link_tls or args.link_cafile:
        try:
            tls = client_tls_context(args.link_cafile)
        except (OSError, ValueError) as e:
            raise PyChatError(f"cannot load --link-cafile: {e}") from None
    return {"link": (host, int(port)), "link_name": name, "link_password": lines[0],
            "link_peer_password": lines[1] if len(lines) > 1 else lines[0], "link_tls": tls}


class Link(asyncio.Protocol):
    """The uplink: connects to the hub, handshakes, bursts, keeps the link
    alive, and after a split reconnects with backoff and bursts again."""

    def __init__(self, server: ChatServer):
        self.server = server
        cfg = server.cfg
        assert cfg.link is not None
        self.address = cfg.link
        self.me = cfg.link_name
        self.state = "down"          # down, handshake, burst (the hub's), linked
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.paused = False
        self.hub = ""                # the hub's name, from its SERVER line
        self.hub_version = ""
        self.passed = False          # the hub gave the right password
        self.nicklen = 0             # the network's NICKLEN (bytes)
        self.servers: dict[str, str] = {}  # server name (lower) -> the one it is behind
        self.tokens: dict[str, str] = {}   # the hub's server tokens -> server name
        self.users: dict[str, RemoteUser] = {}  # nick key -> remote user
        self.topics: dict[str, str] = {}   # the hub's burst: channel key -> its topic
        # Who came back in each room, and from where: the hub's burst, or the
        # burst of a server joining the network (NJOINs); said in one line.
        self.back: dict[tuple[Room, str], list[str]] = {}
        self.netjoin_timer: asyncio.TimerHandle | None = None
        self.netjoin_since = 0.0
        self.memberships = 0         # remote users' places in rooms (at most; see join)
        self.counted_at = -math.inf
        self.hidden: set[str] = set()  # nick keys of the network's people not shown here
        self.net: dict[str, Session] = {}  # this server's people, by the nick the network has
        self.held: list[tuple[Session, dict]] = []  # said during the hub's burst: sent after
        self.channellen = 50         # the network's CHANNELLEN (bytes)
        self.topiclen = 0            # the network's TOPICLEN (bytes), once it says
        self.split_nicks: dict[str, str] = {}  # cut off by the last split: nick key -> server
        self.lag: float | None = None
        self.pinged_at: float | None = None
        self.ping_due = 0.0
        self.linked_at = 0.0         # time.time() of the last burst's end
        self.last_error = ""
        self.skipped = 0             # lines skipped: malformed, unknown prefix, over a cap
        self.not_shown = 0           # remote users past max_remote_users
        self.first: asyncio.Future = server.loop.create_future()  # the first try's outcome
        self.reported = False        # this try's failure was said
        self.lost: asyncio.Future | None = None
        self.task: asyncio.Task | None = None

    # --- lifecycle
    def start(self) -> None:
        self.task = self.server.loop.create_task(self._run())

    async def _run(self) -> None:
        loop = self.server.loop
        delay = LINK_RETRY_FIRST
        host, port = self.address
        while not self.server.shutting_down:
            self.lost = loop.create_future()
            try:
                await asyncio.wait_for(loop.create_connection(
                    lambda: self, host, port, ssl=self.server.cfg.link_tls,
                    server_hostname=host if self.server.cfg.link_tls else None),
                    LINK_HANDSHAKE_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:  # ssl errors are OSErrors
                why = "nothing listens there (is ngircd running, on that port?)" \
                    if isinstance(e, ConnectionRefusedError) else \
                    (getattr(e, "strerror", None) or str(e) or "no answer in time")
                self.failed(f"cannot reach the hub at {host}:{port}: {why}")
            else:
                timer = loop.call_later(LINK_HANDSHAKE_TIMEOUT, self._handshake_late)
                await self.lost
                timer.cancel()
                if self.linked_at and time.time() - self.linked_at > LINK_STABLE:
                    delay = LINK_RETRY_FIRST
            if self.server.shutting_down:
                break
            log.debug("link: trying %s:%d again in %.0f s", host, port, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, LINK_RETRY_MAX)

    def _handshake_late(self) -> None:
        if self.state == "handshake" and not self.hub:
            self.cut(f"no IRC hub answered at {self.address[0]}:{self.address[1]} (is it "
                     "ngircd's port?)")
        elif self.state in ("handshake", "burst"):
            self.cut("the hub did not finish the handshake in time")

    def failed(self, why: str) -> None:
        """A try that did not link: the first is reported by whoever
        started the server (see linked()), the others are logged."""
        self.last_error = why
        if self.first.done():
            log.warning("link: %s", why)
        else:
            self.first.set_result(why)
        self.reported = True

    def close(self) -> None:
        self.last_error = "this server is shutting down"
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.send(f":{self.me} SQUIT {self.me} :server shutting down")
            self.transport.close()

    def cut(self, why: str) -> None:
        """End the link (it is retried): a broken or hostile hub."""
        self.last_error = why
        if self.transport is not None:
            log.warning("link: closing the link to %s: %s", self.hub or "the hub", why)
            self.transport.write(irc_line(f"ERROR :{why}"))
            self.transport.abort()

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inbuf = bytearray()
        self.state, self.passed, self.hub = "handshake", False, ""
        self.reported = False  # (nicklen stays: nicks taken during a split keep to it)
        self.pinged_at = self.lag = None
        cfg = self.server.cfg
        self.send(f"PASS {cfg.link_password} 0210-IRC+ PyChat|{__version__}:CH")
        self.send(f"SERVER {self.me} 1 :PyChat {__version__}: {cfg.name or SERVER_NAME}")

    def connection_lost(self, exc: Exception | None) -> None:
        was, self.transport, self.state = self.state, None, "down"
        why = self.last_error or (f"{exc}" if exc else "the hub closed the link")
        if was == "linked":
            log.log(logging.INFO if self.server.shutting_down else logging.WARNING,
                    "link: lost the link to %s: %s", self.hub, why)
        elif not self.reported:
            self.failed(why if self.last_error else f"the hub at {self.address[0]}:"
                        f"{self.address[1]} closed the connection during the handshake")
        self.split_off(None, f"{self.hub or 'the network'} {self.me}")
        self.servers.clear()
        self.tokens.clear()
        self.topics.clear()
        self.back.clear()
        self.hidden.clear()
        self.net.clear()
        self.held.clear()
        for room in self.server.rooms.values():  # the network's bans went with it
            room.bans.clear()
        if self.netjoin_timer is not None:
            self.netjoin_timer.cancel()
            self.netjoin_timer = None
        self.last_error = ""
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.inbuf += data
        if not self.paused:
            self._lines()

    def _lines(self) -> None:
        """Handle the complete lines in hand for at most a tick, so that a
        huge burst never stops this server's own chat; the rest after the
        tick's output is written, with reading paused meanwhile."""
        buf, start, began = self.inbuf, 0, time.perf_counter()
        while self.transport is not None:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line, start = bytes(buf[start:nl]), nl + 1
            self.handle(line)
            if time.perf_counter() - began > TICK_SECONDS and buf.find(b"\n", start) >= 0:
                del buf[:start]
                if not self.paused and self.transport is not None:
                    self.paused = True
                    self.transport.pause_reading()
                self.server.schedule_flush()
                self.server.loop.call_soon(self._lines)
                return
        del buf[:start]
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        if len(buf) > LINK_MAX_PENDING:
            self.cut(f"a line of more than {LINK_MAX_PENDING} bytes")

    # --- output
    def send(self, text: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(irc_line(text))
        if transport.get_write_buffer_size() > LINK_MAX_BACKLOG:
            self.cut("the hub stopped reading")

    def relay(self, s: Session, event: dict) -> None:
        """Something a user of this server did, for the network: the one
        place where an event becomes a server-link line."""
        kind, nick = event["type"], s.nick
        if self.state == "burst" and kind in ("msg", "pm", "topic") and \
                len(self.held) < LINK_MAX_HELD:
            self.held.append((s, event))  # (the hub's burst is short: sent at its end)
        if self.state != "linked":
            return  # the burst at the next link says where everyone is
        if kind == "intro":
            self.introduce(s)
        elif kind == "join":
            self.send(f":{nick} JOIN {event['room']}")
        elif kind == "leave" and event.get("reason") == "part":
            self.send(f":{nick} PART {event['room']} :{event.get('message', '')}")
        elif kind == "leave" and event.get("reason") == "kick":
            self.send(f":{event['by']} KICK {event['room']} {event['nick']} "
                      f":{event.get('message') or event['by']}")
        elif kind == "leave":
            self.send(f":{nick} QUIT :{event.get('message') or event.get('reason')}")
            self.net.pop(nick_key(str(nick)), None)
        elif kind in ("msg", "pm"):
            self.say(s, event)
        elif kind == "nick":
            self.send(f":{event['old']} NICK {event['new']}")
            self.net.pop(nick_key(event["old"]), None)  # (if the hub refuses, it says: 433)
            self.net[nick_key(event["new"])] = s
        elif kind == "away":  # servers say away as a user mode, without the text
            self.send(f":{nick} MODE {nick} :{'+a' if event['away'] else '-a'}")
        elif kind == "topic":
            self.send(f":{nick} TOPIC {event['room']} :{event['topic']}")
        elif kind == "mode":
            self.send(f":{nick} MODE {event['room']} {'+' if event['op'] else '-'}o "
                      f"{event['nick']}")

    def say(self, s: Session, event: dict) -> None:
        """A message as PRIVMSG/NOTICE lines that stay within 512 bytes when
        the hub passes them on with the sender's whole nick!user@host."""
        target = event.get("room") or event["to"]
        command = "NOTICE" if event.get("notice") else "PRIVMSG"
        head = f":{s.nick} {command} {target} :"
        wrap = "\x01ACTION {}\x01" if event.get("action") else \
            "\x01{}\x01" if event.get("ctcp") else "{}"
        relayed = f":{self.mask(s)} {command} {target} :{wrap.format('')}"
        budget = IRC_MAX_LINE - 2 - len(relayed.encode("utf-8"))
        for piece in irc_split(event["text"], max(budget, 50)):
            self.send(head + wrap.format(piece))

    def mask(self, s: Session) -> str:
        """nick!user@host, as the network knows her."""
        user, host, _ = irc_identity(s, self.me)
        return f"{s.nick}!{user}@{host}"

    def introduce(self, s: Session, rooms: bool = False) -> None:
        """Someone here, for the network (`rooms`: and the rooms she is in)."""
        user, host, real = irc_identity(s, self.me)
        self.net[nick_key(str(s.nick))] = s
        self.send(f":{self.me} NICK {s.nick} 1 {user} {host} 1 + :{real}")
        if s.away is not None:
            self.send(f":{s.nick} MODE {s.nick} :+a")
        for room in s.rooms.values() if rooms else ():
            self.send(f":{s.nick} JOIN {room.name}")

    # --- what the network's rules ask of this server's users
    def nick_problem(self, nick: str) -> str | None:
        """Why a nick cannot cross the link: a dot (server names have them),
        a colon, a channel rank's sign first (NJOIN's @+%&~) or a dash, or
        more bytes than the network's NICKLEN."""
        if "." in nick or ":" in nick or nick[0] in "@+%&~-":
            return ("On a server linked to a network, a nick has no dot or colon and does "
                    "not start with @ + % & ~ or -.")
        if self.nicklen and len(nick.encode("utf-8")) > self.nicklen:
            return (f"While this server is linked to {self.hub or 'a network'}, a nick has at "
                    f"most {self.nicklen} bytes (letters outside ASCII take 2 to 4).")
        return None

    def hides(self, nick: str) -> bool:
        """Someone on the network has the nick, though she is not shown here."""
        return nick_key(nick) in self.hidden

    def room_problem(self, name: str) -> str | None:
        if ":" in name or len(name.encode("utf-8")) > self.channellen:
            return (f"On a server linked to a network, a room name has no colon and at most "
                    f"{self.channellen} bytes.")
        return None

    def split_from(self, nick: str) -> str | None:
        """The server of someone cut off by the last netsplit, if she was."""
        return self.split_nicks.get(nick_key(nick))

    def free_nick(self, nick: str) -> str:
        """A nick like `nick` that nobody has, here or on the network."""
        limit = self.nicklen or MAX_NICK_LEN
        for n in itertools.count(1):
            stem, suffix = nick, f"_{n}"
            while stem and len((stem + suffix).encode("utf-8")) > limit:
                stem = stem[:-1]
            candidate = (stem or "guest") + suffix
            if nick_key(candidate) not in self.server.nicks and not nick_problem(candidate) \
                    and not self.hides(candidate) and not self.nick_problem(candidate):
                return candidate
        raise AssertionError("unreachable")

    def clash(self, s: Session, why: str) -> None:
        """Someone here has a nick the network has too (or took from her with
        a collision KILL): she keeps her connection, everything she typed and
        her rooms, under a free nick, and is told why.  What the network
        knows of her is mended by whoever calls this (a KILL, a 433)."""
        old = str(s.nick)
        new = self.free_nick(old)
        self.server.rename(s, new)
        s.tell({"type": "notice", "text": f"{why}, so you are now {new} (/nick to choose "
                                          "another)."})
        log.info("link: %s here is now %s: %s", old, new, why)

    # --- input from the hub
    def handle(self, line: bytes) -> None:
        if len(line) > IRC_MAX_LINE:
            self.skip(f"a line of {len(line)} bytes (512 at most)")
            return
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if not text.strip():
            return
        prefix = text[1:].partition(" ")[0] if text.startswith(":") else ""
        command, params = irc_parse(text)
        handler = LINK_COMMANDS.get(command)
        if handler is None:
            return  # numerics and commands a leaf has no use for
        try:
            handler(self, prefix, params)
        except (IndexError, KeyError, ValueError, TypeError) as e:
            self.skip(f"{command}: {type(e).__name__}: {e}")

    def skip(self, why: str) -> None:
        self.skipped += 1
        self.server.note_trouble("link", f"link: skipped a line from {self.hub or 'the hub'}: "
                                 f"{why}", logging.WARNING)

    def user_of(self, prefix: str) -> RemoteUser | None:
        u = self.users.get(nick_key(prefix))
        if u is None:
            self.skip(f"no such user: {prefix[:40]}")
        return u

    def on_pass(self, prefix: str, p: list[str]) -> None:
        if self.state != "handshake":
            return
        if not hmac.compare_digest(p[0].encode("utf-8"),
                                   self.server.cfg.link_peer_password.encode("utf-8")):
            self.failed("the hub sent the wrong password (its MyPassword for this server "
                        "must be the second line of --link-password-file, or the first)")
            self.cut("Bad password")
            return
        self.passed = True
        self.hub_version = p[2].split(":")[0].replace("|", " ") if len(p) > 2 else ""

    def on_server(self, prefix: str, p: list[str]) -> None:
        name = p[0]
        if self.state == "handshake":
            if not self.passed:
                self.cut("no PASS before SERVER")
                return
            self.hub = name
            self.servers[name.lower()] = ""
            return
        if len(self.servers) >= MAX_LINK_SERVERS or name.lower() in self.servers or \
                name.lower() == self.me.lower():
            self.skip(f"SERVER {name[:60]}: this server, one known already, or more than "
                      f"{MAX_LINK_SERVERS}")
            return
        self.servers[name.lower()] = (prefix or self.hub).lower()
        if len(p) >= 4 and len(self.tokens) < MAX_LINK_SERVERS:
            self.tokens[p[2]] = name

    def on_005(self, prefix: str, p: list[str]) -> None:
        for item in p[1:]:
            if item.startswith("NICKLEN=") and item[8:].isdigit():
                self.nicklen = min(int(item[8:]), 4 * MAX_NICK_LEN)
            elif item.startswith("CHANNELLEN=") and item[11:].isdigit():
                self.channellen = max(2, min(int(item[11:]), 200))
            elif item.startswith("TOPICLEN=") and item[9:].isdigit():
                self.topiclen = int(item[9:])

    def on_376(self, prefix: str, p: list[str]) -> None:
        """The hub's end of handshake: this server says the same NICKLEN
        (a different one closes the link), then the hub bursts."""
        if self.state != "handshake" or not self.hub:
            return
        limits = f"NICKLEN={self.nicklen} " if self.nicklen else ""
        self.send(f":{self.me} 005 {self.hub} {limits}CASEMAPPING=ascii PREFIX=(ov)@+ "
                  "CHANTYPES=# :are supported on this server")
        self.send(f":{self.me} 376 {self.hub} :End of MOTD command")
        self.state = "burst"

    def on_ping(self, prefix: str, p: list[str]) -> None:
        self.send(f":{self.me} PONG {self.me} :{p[0] if p else self.me}")
        if self.state == "burst":  # the hub's burst is over: now ours
            self.burst()

    def on_pong(self, prefix: str, p: list[str]) -> None:
        if self.pinged_at is not None:
            self.lag = self.server.loop.time() - self.pinged_at
            self.pinged_at = None

    def keepalive(self) -> None:
        """From the housekeeping: ping the hub, and cut a silent one."""
        if self.state != "linked":
            return
        now = self.server.loop.time()
        if self.pinged_at is not None:
            if now - self.pinged_at > LINK_TIMEOUT:
                self.cut("ping timeout")
        elif now >= self.ping_due:
            self.pinged_at, self.ping_due = now, now + LINK_PING_EVERY
            self.send(f"PING :{self.me}")

    def burst(self) -> None:
        """This server's users and rooms, once the hub has sent its own: a
        user whose nick the network has already is renamed first."""
        self.state, self.linked_at = "linked", time.time()
        self.ping_due = 0.0  # at once: the lag is known from the start
        server = self.server
        for s in [u for u in server.nicks.values() if not u.remote]:
            problem = self.nick_problem(str(s.nick))
            if problem:  # (not introduced yet: she goes out under the new nick)
                self.clash(s, f"Your nick cannot cross to the network ({problem[:-1]})")
            self.introduce(s)
        for room in server.rooms.values():
            here = [("@" if k in room.ops else "") + str(m.nick)
                    for k, m in room.members.items() if not m.remote]
            if room.topic and not self.topics.get(room.key) and here:
                self.send(f":{self.me} CHANINFO {room.name} + :{room.topic}")
            head = f":{self.me} NJOIN {room.name} :"
            while here:  # as many as fit in a line
                taken, size = 0, len(head.encode("utf-8"))
                while taken < len(here) and size + len(here[taken].encode("utf-8")) + 1 < \
                        IRC_MAX_LINE - 2:
                    size += len(here[taken].encode("utf-8")) + 1
                    taken += 1
                self.send(head + ",".join(here[:taken]))
                here = here[taken:]
        self.netjoin()
        self.topics.clear()
        self.split_nicks.clear()
        held, self.held = self.held, []
        for s, event in held:  # what was said meanwhile, by those still here
            if s.nick is not None and server.nicks.get(nick_key(s.nick)) is s:
                self.relay(s, event)
        here = server.local_users()
        log.log(logging.INFO if self.first.done() else logging.DEBUG,  # (the first: printed)
                 "link: linked to %s (%s) at %s:%d: %s, %s here",
                 self.hub, self.hub_version or "?", *self.address, self.counted(),
                 counted(here, "person", "people"))
        if not self.first.done():
            self.first.set_result(None)

    # --- the network's people
    def on_nick(self, prefix: str, p: list[str]) -> None:
        if len(p) >= 7:
            self.arrive(prefix, p)
            return
        new = p[0]
        if nick_key(prefix) in self.hidden:  # someone not shown: only her nick matters
            self.hidden.discard(nick_key(prefix))
            self.hidden.add(nick_key(new))
            return
        u = self.user_of(prefix)
        if u is None or nick_key(new) == nick_key(str(u.nick)) and new == u.nick:
            return
        if nick_problem(new):
            self.skip(f"a nick PyChat cannot show: {new[:40]!r}")
            self.quit(u, "renamed to a nick this server cannot show")
            self.hide(new)
            return
        other = self.server.nicks.get(nick_key(new))
        if other is not None and other is not u:
            if other.remote:
                self.skip(f"NICK to {new[:40]}, which another remote user has")
                return
            self.clash(other, f"Someone on the network is now called {other.nick}")
        del self.users[nick_key(str(u.nick))]
        self.users[nick_key(new)] = u
        self.server.rename(u, new)

    def hide(self, nick: str) -> None:
        """Someone on the network not shown here: her nick is still hers (a
        set of keys, MAX_HIDDEN_NICKS at most)."""
        if len(self.hidden) < MAX_HIDDEN_NICKS:
            self.hidden.add(nick_key(nick))

    def arrive(self, prefix: str, p: list[str]) -> None:
        """NICK nick hops user host token modes :real name -- someone new."""
        nick = p[0]
        key = nick_key(nick)
        if nick_problem(nick) or key in self.users:
            self.skip(f"a nick PyChat cannot show, or twice: {nick[:40]!r}")
            if nick_problem(nick):
                self.hide(nick)
            return
        if len(self.users) >= self.server.cfg.max_remote_users:
            self.not_shown += 1
            self.hide(nick)
            self.server.note_trouble("link-cap", f"link: the network has more than "
                                     f"{self.server.cfg.max_remote_users} people; the rest "
                                     "are not shown here (--max-remote-users)", logging.WARNING)
            return
        via = self.tokens.get(p[4]) or (prefix if prefix.lower() in self.servers else self.hub)
        local = self.server.nicks.get(key)
        if local is not None:
            self.clash(local, f"Someone on {via} is called {nick} too")
        u = RemoteUser(self.server, nick, via, _link_field(p[2], 32), _link_field(p[3], 64),
                       _link_field(p[-1], 100))
        self.split_nicks.pop(key, None)  # back: reachable again
        if "a" in p[5]:
            u.away = ""
        self.users[key] = u
        self.server.nicks[key] = u

    def on_quit(self, prefix: str, p: list[str]) -> None:
        if nick_key(prefix) in self.hidden:
            self.hidden.discard(nick_key(prefix))
            return
        u = self.user_of(prefix)
        if u is not None:
            self.quit(u, clean_text(p[0] if p else "Quit")[:MAX_REASON_LEN])

    def on_kill(self, prefix: str, p: list[str]) -> None:
        """A KILL: a remote user is gone; one of ours lost her nick on the
        network (a nick collision) and is introduced again under another."""
        key = nick_key(p[0])
        why = clean_text(p[1] if len(p) > 1 else "killed")[:MAX_REASON_LEN]
        mine = self.net.pop(key, None)  # one of ours, by the nick the network had
        if mine is not None and mine.nick is not None:
            if nick_key(mine.nick) == key:
                self.clash(mine, f"The network took the nick {mine.nick} back ({why})")
            self.introduce(mine, rooms=True)  # new to the network now
        elif key in self.users:
            self.quit(self.users[key], f"Killed ({why})")
        else:
            self.hidden.discard(key)

    def quit(self, u: RemoteUser, message: str, told: bool = True) -> None:
        server, key = self.server, nick_key(str(u.nick))
        event = {"type": "leave", "room": "", "nick": u.nick, "reason": "quit",
                 "message": message, "via": u.via, "ts": round(time.time(), 3)}
        for room in list(u.rooms.values()):
            room.leave(key)
            if told:
                server.presence(room, dict(event, room=room.name), u)
            server._forget_if_empty(room)
        u.rooms.clear()
        if server.nicks.get(key) is u:
            del server.nicks[key]
        self.users.pop(key, None)

    def on_squit(self, prefix: str, p: list[str]) -> None:
        name = p[0].lower()
        if name in (self.me.lower(), self.hub.lower()):
            self.cut(f"the hub removed this server ({p[-1] if len(p) > 1 else 'SQUIT'})")
            return
        gone, grew = {name}, True
        while grew:  # and every server behind it
            more = {s for s, up in self.servers.items() if up in gone} - gone
            grew = bool(more)
            gone |= more
        for s in gone:
            self.servers.pop(s, None)
        self.split_off(gone, f"{self.hub} {p[0]}", p[0])

    def split_off(self, servers: set[str] | None, why: str, where: str = "") -> None:
        """A netsplit: the people on `servers` (None: everyone) are gone, in
        one line for each room, not one leave for each of them."""
        gone = [u for u in self.users.values() if servers is None or u.via.lower() in servers]
        rooms: dict[Room, list[str]] = {}
        for u in gone:
            for room in u.rooms.values():
                rooms.setdefault(room, []).append(str(u.nick))
            if len(self.split_nicks) < self.server.cfg.max_remote_users:
                self.split_nicks[nick_key(str(u.nick))] = u.via
            self.quit(u, why, told=False)
        for room, nicks in rooms.items():
            if self.server.rooms.get(room.key) is room:
                self.announce(room, nicks, "left", where)

    def announce(self, room: Room, nicks: list[str], what: str, where: str = "") -> None:
        """One line for a netsplit or netjoin in a room, and the room's new
        user list; IRC members get QUITs or JOINs, which their clients fold.
        `where`: the server they are on; "" when it is this server's own link
        that went or came (they may be on any server beyond the hub)."""
        people = counted(len(nicks), "person", "people")
        hub = self.hub or "the hub"
        if where:
            text = f"{'netjoin' if what == 'joined' else 'netsplit'}: {people} on {where} " \
                   f"{what} {room.name}"
        elif what == "joined":
            text = f"netjoin: {people} back in {room.name} (linked to {hub} again)"
        else:
            text = f"netsplit: {people} left {room.name} (the link to {hub} is down)"
        where = where or hub
        event = {"type": "notice", "room": room.name, "text": text, "split": where,
                 "between": f"{where} {self.me}", "nicks": nicks, "ts": round(time.time(), 3)}
        if what == "joined":
            event["joined"] = True
        self.server.broadcast(room, event)
        self.server.broadcast(room, dict(room.users_event(), refresh=True))

    # --- rooms
    def room(self, name: str, make: bool = True) -> Room | None:
        """The room for a channel of the network's, made if `make` and allowed."""
        server = self.server
        room = server.rooms.get(nick_key(name))
        if room is not None or not make:
            return room
        if room_problem(name):
            self.skip(f"a channel PyChat has no room for: {name[:60]!r}")
            return None
        if server.rooms_made.get(NETWORK_ROOMS, 0) >= server.cfg.max_remote_rooms or \
                len(server.rooms) >= server.cfg.max_rooms:
            self.skip(f"too many rooms to make {name[:60]!r} too")
            return None
        room = server.rooms[nick_key(name)] = Room(name, server.cfg.history)
        room.made_by = NETWORK_ROOMS
        server.rooms_made[NETWORK_ROOMS] = server.rooms_made.get(NETWORK_ROOMS, 0) + 1
        topic = self.topics.get(room.key)
        if topic:
            room.topic, room.topic_by, room.topic_ts = topic, self.hub, round(time.time(), 3)
        return room

    def join(self, u: RemoteUser, name: str, op: bool, burst: bool = False) -> None:
        """Someone joins a room: by JOIN, or in a server's burst (NJOIN, only
        ever sent when a server links), which is told as one netjoin line."""
        if nick_key(name) in u.rooms:
            return
        if len(u.rooms) >= MAX_REMOTE_ROOMS_PER_USER or not self.room_for_one_more():
            self.skip(f"{u.nick} is in more than {MAX_REMOTE_ROOMS_PER_USER} rooms, or the "
                      f"network's people are in {MAX_REMOTE_MEMBERSHIPS:,} places already")
            return
        room = self.room(name)  # (checked first: no room is made for nobody)
        if room is None:
            return
        key = nick_key(str(u.nick))
        event = {"type": "join", "room": room.name, "nick": u.nick, "via": u.via,
                 "ts": round(time.time(), 3)}
        if u.away is not None:
            event["away"] = u.away
        if self.state != "linked":  # the hub's burst: said in one line at its end
            self.back.setdefault((room, ""), []).append(str(u.nick))
        elif burst:  # another server's: once its NJOINs stop
            self.back.setdefault((room, u.via), []).append(str(u.nick))
            self.netjoin_soon()
        else:
            self.server.presence(room, event, u)
        room.add(key, u)
        u.rooms[room.key] = room
        if op:
            room.ops.add(key)

    def room_for_one_more(self) -> bool:
        """Under MAX_REMOTE_MEMBERSHIPS: counted up on each join, and counted
        again from the rooms (which know their remote members) at most once
        a second when the count says the cap is reached."""
        if self.memberships >= MAX_REMOTE_MEMBERSHIPS:
            now = self.server.loop.time()
            if now - self.counted_at < 1.0:
                return False
            self.counted_at = now
            self.memberships = sum(r.remote_count for r in self.server.rooms.values())
            if self.memberships >= MAX_REMOTE_MEMBERSHIPS:
                return False
        self.memberships += 1
        return True

    def netjoin_soon(self) -> None:
        """Another server's people keep coming: say so once they stop (or
        after NETJOIN_WAIT at most)."""
        now = self.server.loop.time()
        if self.netjoin_timer is None:
            self.netjoin_since = now
        elif now - self.netjoin_since < NETJOIN_WAIT:
            self.netjoin_timer.cancel()
        else:
            return
        self.netjoin_timer = self.server.loop.call_later(NETJOIN_QUIET, self.netjoin)

    def netjoin(self) -> None:
        """One line for each room someone came back to, and its new list."""
        if self.netjoin_timer is not None:
            self.netjoin_timer.cancel()
            self.netjoin_timer = None
        back, self.back = self.back, {}
        for (room, where), nicks in back.items():
            nicks = [n for n in nicks if nick_key(n) in room.members]  # (not gone since)
            if nicks and self.server.rooms.get(room.key) is room:
                self.announce(room, nicks, "joined", where)

    def on_njoin(self, prefix: str, p: list[str]) -> None:
        for entry in p[1].split(","):
            nick = entry.lstrip("~&@%+")
            u = self.users.get(nick_key(nick)) if nick else None
            if u is not None:
                self.join(u, p[0], "@" in entry[:len(entry) - len(nick)], burst=True)

    def on_join(self, prefix: str, p: list[str]) -> None:
        u = self.user_of(prefix)
        if u is None:
            return
        for channel in p[0].split(","):
            name, _, modes = channel.partition("\x07")  # a new channel: "#name\x07o"
            if name == "0":  # JOIN 0: out of every channel
                for room in list(u.rooms.values()):
                    self.part(u, room, "")
            else:
                self.join(u, name, "o" in modes)

    def on_part(self, prefix: str, p: list[str]) -> None:
        u = self.user_of(prefix)
        for name in p[0].split(",") if u is not None else ():
            room = u.rooms.get(nick_key(name))  # type: ignore[union-attr]
            if room is not None:
                self.part(u, room, clean_text(p[1] if len(p) > 1 else "")[:MAX_REASON_LEN])

    def part(self, u: RemoteUser, room: Room, message: str) -> None:
        event = {"type": "leave", "room": room.name, "nick": u.nick, "reason": "part",
                 "via": u.via, "ts": round(time.time(), 3)}
        if message:
            event["message"] = message
        self.server.broadcast(room, event)
        room.leave(nick_key(str(u.nick)))
        u.rooms.pop(room.key, None)
        self.server._forget_if_empty(room)

    def sender(self, prefix: str) -> str | None:
        """Who did it, by the network's word: one of its people or servers,
        never someone here (a hub cannot act in her name); None, skipped."""
        u = self.users.get(nick_key(prefix))
        if u is not None:
            return str(u.nick)
        if prefix.lower() in self.servers:
            return prefix
        self.skip(f"{prefix[:40]} is none of the network's people or servers")
        return None

    def on_kick(self, prefix: str, p: list[str]) -> None:
        """The network's channel operators' kicks hold here, of anyone."""
        room = self.room(p[0], make=False)
        by = self.users.get(nick_key(prefix))
        if self.sender(prefix) is None:
            return
        for nick in p[1].split(",") if room is not None else ():
            target = room.members.get(nick_key(nick))  # type: ignore[union-attr]
            if target is not None:
                self.server.kick_out(room, target, by.nick if by else prefix,  # type: ignore
                                     clean_text(p[2] if len(p) > 2 else "")[:MAX_REASON_LEN],
                                     via=by.via if by else prefix)

    def on_chaninfo(self, prefix: str, p: list[str]) -> None:
        """CHANINFO #channel +modes [key limit] :topic (the hub's burst)."""
        topic = clean_text(p[-1]).replace("\n", " ")[:MAX_TOPIC] if len(p) > 2 else ""
        if not topic or len(self.topics) >= self.server.cfg.max_remote_rooms:
            return
        self.topics[nick_key(p[0])] = topic
        room = self.room(p[0], make=False)
        if room is not None and not room.topic:
            self.set_topic(room, topic, self.hub)

    def on_topic(self, prefix: str, p: list[str]) -> None:
        room = self.room(p[0], make=False)
        by = self.sender(prefix)
        if room is not None and len(p) > 1 and by is not None:
            self.set_topic(room, clean_text(p[1]).replace("\n", " ")[:MAX_TOPIC], by)

    def set_topic(self, room: Room, topic: str, by: str) -> None:
        room.topic, room.topic_by, room.topic_ts = topic, by, round(time.time(), 3)
        event = dict(room.topic_event(), via=self.hub)
        self.server._persist(room, room.topic_event())
        self.server.broadcast(room, event)

    def on_mode(self, prefix: str, p: list[str]) -> None:
        """Channel operators (+o/-o) and bans (+b/-b) of the network's, and a
        remote user's away (+a/-a: servers send no away text)."""
        target = p[0]
        if not target.startswith("#"):
            u = self.users.get(nick_key(target))
            if u is not None and len(p) > 1 and "a" in p[1]:
                self.away(u, p[1].startswith("+"))
            return
        room = self.room(target, make=False)
        if room is None or len(p) < 2 or self.sender(prefix) is None:
            return
        args, sign = list(p[2:]), "+"
        by = self.users.get(nick_key(prefix))
        for mode in p[1]:
            if mode in "+-":
                sign = mode
            elif mode in "ovhbeIkl" and (mode != "l" or sign == "+") and args:
                arg = args.pop(0)
                if mode == "o":
                    self.op(room, arg, sign == "+", str(by.nick) if by else prefix)
                elif mode == "b":
                    self.ban(room, arg, sign == "+")

    def op(self, room: Room, nick: str, on: bool, by: str) -> None:
        target = room.members.get(nick_key(nick))
        if target is None or (nick_key(nick) in room.ops) == on:
            return
        if not on and not target.remote:
            return  # the network cannot take a room away from the people here who run it
        (room.ops.add if on else room.ops.discard)(nick_key(nick))
        self.server.broadcast(room, {"type": "mode", "room": room.name, "nick": target.nick,
                                     "op": on, "by": by, "via": self.hub,
                                     "ts": round(time.time(), 3)})

    def ban(self, room: Room, mask: str, on: bool) -> None:
        if on and mask not in room.bans and len(room.bans) < 100:
            room.bans.append(mask[:200])
        elif not on and mask in room.bans:
            room.bans.remove(mask)

    def away(self, u: RemoteUser, away: bool) -> None:
        if (u.away is not None) == away:
            return
        for room in u.rooms.values():
            room.away_count += 1 if away else -1
        u.away = "" if away else None
        event = {"type": "away", "nick": u.nick, "away": away, "via": u.via}
        if away:
            event["message"] = ""
        self.server._tell_sharers(u, event)

    def on_away(self, prefix: str, p: list[str]) -> None:
        u = self.user_of(prefix)
        if u is not None:
            self.away(u, bool(p and p[0]))

    # --- messages
    def on_privmsg(self, prefix: str, p: list[str], notice: bool = False) -> None:
        server = self.server
        u = self.users.get(nick_key(prefix))
        text = p[1] if len(p) > 1 else ""
        if u is None:
            if prefix.lower() in self.servers and notice:  # a server's notice to someone here
                for nick in p[0].split(","):
                    s = server.nicks.get(nick_key(nick))
                    if s is not None and not s.remote:
                        s.tell({"type": "notice", "text": f"{prefix}: {clean_text(text)}"})
            else:
                self.skip(f"no such user: {prefix[:40]}")
            return
        action = ctcp = False
        if text.startswith("\x01"):
            body = text.strip("\x01")
            if body.upper().startswith("ACTION "):
                text, action = body[7:], True
            else:
                text, ctcp = body, True
        text = clean_text(text)
        if not text.strip():
            return
        for target in p[0].split(",")[:4]:
            if target.startswith("#"):
                room = u.rooms.get(nick_key(target))
                if room is None or ctcp:
                    continue  # not in it (or a CTCP query to everyone): not for PyChat
                event = {"type": "msg", "room": room.name, "from": u.nick, "text": text,
                         "ts": round(time.time(), 3), "id": server.next_id(), "via": u.via}
                if action:
                    event["action"] = True
                if notice:
                    event["notice"] = True
                server.publish(room, event)
            else:
                self.private(u, target, text, action, notice, ctcp)

    def private(self, u: RemoteUser, target: str, text: str, action: bool, notice: bool,
                ctcp: bool) -> None:
        s = self.server.nicks.get(nick_key(target.partition("@")[0]))
        if s is None or s.remote:
            if not notice:
                self.send(f":{self.me} {ERR_NOSUCHNICK} {u.nick} {target} :No such nick")
            return
        event = {"type": "pm", "from": u.nick, "to": s.nick, "text": text,
                 "ts": round(time.time(), 3), "id": self.server.next_id(), "via": u.via}
        for flag, on in (("action", action), ("notice", notice), ("ctcp", ctcp)):
            if on:
                event[flag] = True
        if ctcp and not irc_of(s):
            if text.upper() == "VERSION" and not notice:  # answered for the JSON clients
                self.send(f":{s.nick} NOTICE {u.nick} :\x01VERSION PyChat {__version__}\x01")
            return
        s.tell(event)
        if s.away is not None and not notice:
            self.send(f":{self.me} {RPL_AWAY} {u.nick} {s.nick} :{s.away or 'away'}")

    def on_notice(self, prefix: str, p: list[str]) -> None:
        self.on_privmsg(prefix, p, notice=True)

    # --- questions the network asks this server
    def on_whois(self, prefix: str, p: list[str]) -> None:
        s = self.server.nicks.get(nick_key(p[-1]))
        nick = p[-1]
        if s is None or s.remote:
            self.send(f":{self.me} {ERR_NOSUCHNICK} {prefix} {nick} :No such nick")
        else:
            user, host, real = irc_identity(s, self.me)
            self.send(f":{self.me} {RPL_WHOISUSER} {prefix} {s.nick} {user} {host} * :{real}")
            rooms = " ".join(r.name for r in s.rooms.values())
            if rooms:
                self.send(f":{self.me} {RPL_WHOISCHANNELS} {prefix} {s.nick} :{rooms[:400]}")
            self.send(f":{self.me} {RPL_WHOISSERVER} {prefix} {s.nick} {self.me} :PyChat")
            if s.away is not None:
                self.send(f":{self.me} {RPL_AWAY} {prefix} {s.nick} :{s.away or 'away'}")
        self.send(f":{self.me} {RPL_ENDOFWHOIS} {prefix} {nick} :End of WHOIS list")

    def on_version(self, prefix: str, p: list[str]) -> None:
        self.send(f":{self.me} {RPL_VERSION} {prefix} PyChat-{__version__}. {self.me} :")

    def on_time(self, prefix: str, p: list[str]) -> None:
        self.send(f":{self.me} 391 {prefix} {self.me} :{time.strftime('%A %B %d %Y -- %H:%M %z')}")

    def on_error(self, prefix: str, p: list[str]) -> None:
        why = clean_text(p[0] if p else "error")[:200]
        self.last_error = why
        if self.state != "linked":
            self.failed(f"the hub refused the link: {why}")
        if self.transport is not None:
            self.transport.close()

    def on_numeric_refused(self, prefix: str, p: list[str], taken: bool = False) -> None:
        """432/436/437 (or 433, `taken`): the hub refused a nick change of
        one of ours, and still knows her by the old one, p[0].  Taken: she
        gets a free nick here if she still has that one, and the network
        hears the change; refused (a nick the hub takes only from a server's
        introduction): she quits under the old and is introduced anew."""
        s = self.net.get(nick_key(p[1])) if len(p) > 1 else None
        if s is None or s.nick is None or self.state != "linked" or p[0] == p[1]:
            return
        del self.net[nick_key(p[1])]
        if taken:
            if nick_key(s.nick) == nick_key(p[1]):
                self.clash(s, f"Someone on the network is called {s.nick}")
            self.send(f":{p[0]} NICK {s.nick}")
            self.net[nick_key(s.nick)] = s
        else:
            self.send(f":{p[0]} QUIT :Changed nick to {s.nick}")
            self.introduce(s, rooms=True)

    def on_433(self, prefix: str, p: list[str]) -> None:
        self.on_numeric_refused(prefix, p, taken=True)

    def counted(self) -> str:
        """The network's servers (this one aside) and people, as said."""
        return f"{counted(len(self.servers), 'server')}, " \
               f"{counted(len(self.users), 'person', 'people')} there"

    def status_text(self) -> str:
        host, port = self.address
        if self.state != "linked":
            return f"Not linked to the network ({self.last_error or 'linking'}); trying " \
                   "again."
        minutes = int(time.time() - self.linked_at) // 60
        lag = "?" if self.lag is None else f"{self.lag * 1000:.0f} ms"
        more = f" ({self.not_shown:,} more not shown)" if self.not_shown else ""
        return (f"Linked to {self.hub} at {host}:{port} for {minutes} min, lag {lag}: "
                f"{self.counted()}{more}.")

    def status(self) -> dict:
        return {"state": self.state, "hub": self.hub, "address": "%s:%d" % self.address,
                "me": self.me, "lag_ms": None if self.lag is None else round(self.lag * 1000),
                "servers": len(self.servers), "remote_users": len(self.users),
                "not_shown": self.not_shown, "since": self.linked_at if self.state == "linked"
                else None, "skipped": self.skipped, "last_error": self.last_error}


ChatServer.uplink = Link

LINK_COMMANDS: dict[str, Callable[[Link, str, list[str]], None]] = {
    "PASS": Link.on_pass, "SERVER": Link.on_server, "005": Link.on_005, "376": Link.on_376,
    "PING": Link.on_ping, "PONG": Link.on_pong, "NICK": Link.on_nick, "QUIT": Link.on_quit,
    "KILL": Link.on_kill, "SQUIT": Link.on_squit, "NJOIN": Link.on_njoin,
    "JOIN": Link.on_join, "PART": Link.on_part, "KICK": Link.on_kick,
    "CHANINFO": Link.on_chaninfo, "TOPIC": Link.on_topic, "MODE": Link.on_mode,
    "AWAY": Link.on_away, "PRIVMSG": Link.on_privmsg, "NOTICE": Link.on_notice,
    "WHOIS": Link.on_whois, "VERSION": Link.on_version, "TIME": Link.on_time,
    "ERROR": Link.on_error, "432": Link.on_numeric_refused, "433": Link.on_433,
    "436": Link.on_numeric_refused, "437": Link.on_numeric_refused,
}


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

# Event types the client makes itself; the same types from a server are dropped.
LOCAL_EVENTS = frozenset({"status", "nick_rejected", "failed", "fatal", "outbox", "state",
                          "file_progress", "file_received", "file_sent", "file_failed"})


def download_dir() -> Path:
    """Where received files go unless --download-dir says otherwise."""
    downloads = Path.home() / "Downloads"
    return downloads if downloads.is_dir() else Path.home()


def inside_folder(folder: Path, name: str) -> Path | None:
    """folder / name if that is a file directly inside `folder` once every link
    and .. is resolved; None if it would be anywhere else (a path, "..", an
    absolute path or a drive, or a link pointing out)."""
    path = folder / name
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        return None
    return path


def create_unique(folder: Path, name: str) -> tuple[Path, Any]:
    """Create `name` in `folder` without overwriting anything: "name (1).ext" and
    so on if it exists.  Returns the path and the file, open for writing.
    Raises PermissionError, creating nothing, for a name that would put the
    file outside `folder`: received names are cleaned by safe_file_name when
    the offer arrives, and this is the check on the path itself."""
    stem, ext = os.path.splitext(name)
    if ext == ".part":  # keep "report.pdf.part" together: number the real name
        stem, inner = os.path.splitext(stem)
        ext = inner + ext
    for n in range(10_000):
        path = inside_folder(folder, name if n == 0 else f"{stem} ({n}){ext}")
        if path is None:
            raise PermissionError(errno.EACCES, f"{name} would be saved outside {folder}; "
                                  "refused", name)
        try:
            return path, open(path, "xb")
        except FileExistsError:
            continue
    raise FileExistsError(f"too many files called {name} in {folder}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Events that get "you": true when they are about this client itself.
ABOUT_YOU = frozenset({"msg", "pm", "nick", "join", "leave", "away", "mode", "moderation"})

# Transfer states the UIs show: "offered", "receiving", "sending", then one of
FINAL = frozenset({"done", "received", "declined", "cancelled", "failed"})
MAX_SHOWN_TRANSFERS = 200      # finished ones beyond this are forgotten, oldest first
MAX_PEOPLE = 1000              # private partners a client remembers
MAX_LISTED_ROOMS = 1000        # rooms of a /rooms list it remembers (for Tab)


class ClientState:
    """Everything a client knows about the chat, in one place: its own nick,
    whether it is connected, the rooms it is in (members, operators, topic),
    who is away, the people it talks to privately (and whether they are still
    here) and the file transfers with their states.

    ChatClient feeds it every event it passes on (apply, on the network
    thread) and tells the UI what changed with one {"type": "state", "part":
    ...} event; the UIs never track any of this themselves, they ask the read
    methods below, which copy under a lock (the window reads from Tk's thread).
    """

    PARTS = ("connection", "nick", "rooms", "members", "people", "transfers")

    def __init__(self, nick: str):
        self.lock = threading.RLock()
        self.nick = nick
        self.connected = False
        self.rooms: dict[str, dict] = {}    # room key -> name, members, ops, topic
        self.away: dict[str, str] = {}      # nick key -> away message
        self.via: dict[str, str] = {}       # nick key -> the other server she is on
        self.people: dict[str, dict] = {}   # private partners: nick key -> nick, here
        self.transfers: dict[str, dict] = {}  # transfer id -> what the UIs show of it
        self.listed: dict[str, str] = {}    # room key -> name, from the last /rooms list
        self._apply = {
            "status": self._status, "welcome": self._welcome, "users": self._users,
            "join": self._join, "leave": self._leave, "nick": self._nick,
            "away": self._away, "topic": self._topic, "mode": self._mode,
            "pm": self._pm, "failed": self._failed, "rooms": self._rooms_listed,
            "file_offer": self._file_offer,
            "file_accept": self._file_peer, "file_decline": self._file_peer,
            "file_cancel": self._file_cancel, "file_sent": self._file_peer,
            "file_failed": self._file_failed, "file_received": self._file_received,
            "file_progress": self._file_progress,
        }

    # --- read methods (any thread)
    def room_names(self) -> list[str]:
        with self.lock:
            return [r["name"] for r in self.rooms.values()]

    def known_rooms(self) -> list[str]:
        """Rooms we are in, then the others the last /rooms list named."""
        with self.lock:
            names = [r["name"] for r in self.rooms.values()]
            return names + [n for k, n in self.listed.items() if k not in self.rooms]

    def in_room(self, room: str) -> str | None:
        """The room's name as the server spells it, if we are in it."""
        with self.lock:
            r = self.rooms.get(nick_key(room))
            return r["name"] if r else None

    def members(self, room: str) -> list[str]:
        """Who is in a room we are in, sorted."""
        with self.lock:
            r = self.rooms.get(nick_key(room))
            return sorted(r["members"].values(), key=nick_key) if r else []

    def is_op(self, room: str, nick: str) -> bool:
        with self.lock:
            r = self.rooms.get(nick_key(room))
            return bool(r) and nick_key(nick) in r["ops"]

    def topic(self, room: str) -> str:
        with self.lock:
            r = self.rooms.get(nick_key(room))
            return r["topic"] if r else ""

    def away_message(self, nick: str) -> str | None:
        """None when the nick is not away."""
        with self.lock:
            return self.away.get(nick_key(nick))

    def server_of(self, nick: str) -> str | None:
        """The other server of the network someone is on; None for this one's."""
        with self.lock:
            return self.via.get(nick_key(nick))

    def everyone(self) -> list[str]:
        """Everyone we can see in any of our rooms, sorted."""
        with self.lock:
            seen = {k: n for r in self.rooms.values() for k, n in r["members"].items()}
        return sorted(seen.values(), key=nick_key)

    def here(self, nick: str) -> bool:
        """False for a private partner we saw leave the server."""
        with self.lock:
            person = self.people.get(nick_key(nick))
            return person is None or person["here"]

    def partners(self) -> list[tuple[str, bool]]:
        """The people we talked to privately: (nick, still here)."""
        with self.lock:
            return [(p["nick"], p["here"]) for p in self.people.values()]

    def transfer(self, tid: str) -> dict | None:
        with self.lock:
            t = self.transfers.get(tid)
            return dict(t, peers=dict(t["peers"])) if t else None

    def transfer_list(self) -> list[dict]:
        with self.lock:
            return [dict(t, peers=dict(t["peers"])) for t in self.transfers.values()]

    def where(self, ui: str, room: str, private: str | None = None,
              max_text: int = MAX_TEXT) -> Where:
        """What plan_command needs to know about this client."""
        with self.lock:
            gone = frozenset(k for k, p in self.people.items() if not p["here"])
        return Where(ui=ui, room=room, private=private, rooms=tuple(self.room_names()),
                     nicks=tuple(self.everyone()), gone=gone, max_text=max_text)

    # --- updates (the network thread)
    def apply(self, event: dict) -> str | None:
        """Take in one event; the part of the state it changed, if any."""
        handler = self._apply.get(str(event.get("type")))
        if handler is None:
            return None
        with self.lock:
            return handler(event)

    def welcome(self, nick: str, rooms: dict[str, str]) -> None:
        """A (re)registration: these rooms, members to follow in users events."""
        with self.lock:
            self.nick = nick
            self.rooms = {key: self._room(name) for key, name in rooms.items()}

    def settle(self, tid: str, state: str, reason: str = "") -> str | None:
        """A transfer this client ended itself (declined, cancelled)."""
        with self.lock:
            t = self.transfers.get(tid)
            if t is None:
                return None
            t["state"], t["reason"] = state, reason
            for nick, peer in t["peers"].items():
                if peer in ("waiting", "sending"):
                    t["peers"][nick] = state
            return "transfers"

    @staticmethod
    def _room(name: str) -> dict:
        return {"name": name, "members": {}, "ops": set(), "topic": ""}

    def _status(self, e: dict) -> str | None:
        connected = e.get("state") == "connected"
        if connected == self.connected:
            return None
        self.connected = connected
        return "connection"

    def _welcome(self, e: dict) -> str | None:
        self.nick = str(e.get("nick", self.nick))
        return "rooms"

    def _users(self, e: dict) -> str | None:
        users = e.get("users")
        if not isinstance(users, list) or not e.get("room"):
            return None
        r = self.rooms.setdefault(nick_key(str(e["room"])), self._room(str(e["room"])))
        r["name"] = str(e["room"])
        r["members"] = {nick_key(str(u)): str(u) for u in users}
        ops = e.get("ops") if isinstance(e.get("ops"), list) else []
        r["ops"] = {nick_key(str(u)) for u in ops}
        away = e.get("away") if isinstance(e.get("away"), dict) else {}
        via = e.get("via") if isinstance(e.get("via"), dict) else {}
        for key in r["members"]:  # the list is the truth for everyone in it
            self.away.pop(key, None)
            self.via.pop(key, None)
        self.away.update({nick_key(str(k)): str(v) for k, v in away.items()})
        self.via.update({nick_key(str(k)): str(v) for k, v in via.items()})
        back = [key for key in r["members"] if key in self.people
                and not self.people[key]["here"]]
        for key in back:
            self.people[key]["here"] = True
        return "people" if back else "members"  # "people": the sidebar shows both

    def _join(self, e: dict) -> str | None:
        nick = str(e.get("nick", ""))
        key = nick_key(nick)
        r = self.rooms.get(nick_key(str(e.get("room") or "")))
        if r is None:
            return None
        r["members"][key] = nick
        if isinstance(e.get("away"), str):
            self.away[key] = e["away"]
        else:
            self.away.pop(key, None)
        if isinstance(e.get("via"), str):
            self.via[key] = e["via"]
        else:
            self.via.pop(key, None)
        if key in self.people and not self.people[key]["here"]:
            self.people[key]["here"] = True
            return "people"
        return "members"

    def _leave(self, e: dict) -> str | None:
        key = nick_key(str(e.get("nick", "")))
        room_key = nick_key(str(e.get("room") or ""))
        r = self.rooms.get(room_key)
        if r is not None:
            r["members"].pop(key, None)
            r["ops"].discard(key)
        if key == nick_key(self.nick):
            if e.get("reason") in ("part", "kick"):
                self.rooms.pop(room_key, None)
                return "rooms"
            return None
        if e.get("reason") not in ("part", "kick"):  # gone from the server
            self.away.pop(key, None)
            self.via.pop(key, None)
            if key in self.people:
                self.people[key]["here"] = False
                return "people"
        return "members" if r is not None else None

    def _nick(self, e: dict) -> str | None:
        old, new = str(e.get("old", "")), str(e.get("new", ""))
        old_key, new_key = nick_key(old), nick_key(new)
        for r in self.rooms.values():
            if r["members"].pop(old_key, None) is not None:
                r["members"][new_key] = new
            if old_key in r["ops"]:
                r["ops"].discard(old_key)
                r["ops"].add(new_key)
        if old_key in self.away:
            self.away[new_key] = self.away.pop(old_key)
        if old_key in self.via:
            self.via[new_key] = self.via.pop(old_key)
        if old_key in self.people:  # the conversation follows the new nick
            self.people.pop(old_key)
            self.people[new_key] = {"nick": new, "here": True}
        if old_key == nick_key(self.nick):
            self.nick = new
            return "nick"
        return "members"

    def _away(self, e: dict) -> str | None:
        key = nick_key(str(e.get("nick", "")))
        if e.get("away"):
            self.away[key] = str(e.get("message") or "")
        else:
            self.away.pop(key, None)
        return "members"

    def _topic(self, e: dict) -> str | None:
        r = self.rooms.get(nick_key(str(e.get("room") or "")))
        if r is None:
            return None
        r["topic"] = str(e.get("topic") or "")
        return "members"

    def _mode(self, e: dict) -> str | None:
        r = self.rooms.get(nick_key(str(e.get("room") or "")))
        if r is None:
            return None
        (r["ops"].add if e.get("op") else r["ops"].discard)(nick_key(str(e.get("nick", ""))))
        return "members"

    def _rooms_listed(self, e: dict) -> str | None:
        rooms = [r for r in e.get("rooms") or [] if isinstance(r, dict)]
        self.listed = {nick_key(str(r.get("room"))): str(r.get("room"))
                       for r in rooms[:MAX_LISTED_ROOMS]}
        return None  # nothing on show changes; completion asks for it

    def _pm(self, e: dict) -> str | None:
        mine = nick_key(str(e.get("from", ""))) == nick_key(self.nick)
        other = str(e.get("to") if mine else e.get("from"))
        key = nick_key(other)
        if self.people.get(key) == {"nick": other, "here": True}:
            return None
        self.people[key] = {"nick": other, "here": True}
        while len(self.people) > MAX_PEOPLE:  # forget the first partner met
            del self.people[next(iter(self.people))]
        return "people"

    def _failed(self, e: dict) -> str | None:
        """A private message to someone who is not here: they left."""
        to = e.get("to")
        if e.get("code") != "no_such_nick" or not isinstance(to, str):
            return None
        self.people[nick_key(to)] = {"nick": to, "here": False}
        return "people"

    # --- transfers, as the UIs show them
    def _file_offer(self, e: dict) -> str | None:
        tid = str(e.get("id", ""))
        record = {"id": tid, "name": str(e.get("name", "")), "size": int(e.get("size") or 0),
                  "done": 0, "state": "offered", "reason": "", "path": ""}
        if e.get("mine"):
            recipients = [str(n) for n in e.get("recipients") or []]
            record.update(direction="out", nick=str(e.get("to") or e.get("room") or ""),
                          peers={n: "waiting" for n in recipients})
            if not recipients:
                record["state"] = "done"  # alone in the room: nobody will answer
        else:
            record.update(direction="in", nick=str(e.get("from", "")), peers={})
        self.transfers[tid] = record
        while len(self.transfers) > MAX_SHOWN_TRANSFERS:  # forget the oldest finished (or
            old = next((k for k, t in self.transfers.items() if t["state"] in FINAL), None) \
                or next((k for k, t in self.transfers.items()  # unanswered) one: a hostile
                         if t["state"] == "offered" and t["direction"] == "in"), None)  # server
            if old is None:
                break
            del self.transfers[old]
        return "transfers"

    def _file_peer(self, e: dict) -> str | None:
        """A receiver of our file answered or finished."""
        t = self.transfers.get(str(e.get("id", "")))
        if t is None or t["direction"] != "out":
            return None
        outcome = {"file_accept": "sending", "file_decline": "declined",
                   "file_sent": "received"}[str(e["type"])]
        t["peers"][str(e.get("nick", ""))] = outcome
        self._settle_out(t)
        return "transfers"

    def _file_cancel(self, e: dict) -> str | None:
        t = self.transfers.get(str(e.get("id", "")))
        if t is None or t["state"] in FINAL:
            return None
        if t["direction"] == "in":
            t["state"], t["reason"] = "cancelled", str(e.get("reason") or "cancelled")
        else:
            t["peers"][str(e.get("nick", ""))] = "cancelled"
            self._settle_out(t)
        return "transfers"

    def _file_failed(self, e: dict) -> str | None:
        t = self.transfers.get(str(e.get("id", "")))
        if t is None or t["state"] in FINAL:
            return None
        nick = str(e.get("nick") or "")
        if t["direction"] == "out" and nick in t["peers"]:
            t["peers"][nick] = "failed"
            self._settle_out(t)
        else:
            t["state"], t["reason"] = "failed", str(e.get("reason") or "")
            for n, peer in t["peers"].items():
                if peer in ("waiting", "sending"):
                    t["peers"][n] = "failed"
        return "transfers"

    def _file_received(self, e: dict) -> str | None:
        t = self.transfers.get(str(e.get("id", "")))
        if t is None:
            return None
        t["state"], t["path"], t["done"] = "received", str(e.get("path", "")), t["size"]
        return "transfers"

    def _file_progress(self, e: dict) -> str | None:
        t = self.transfers.get(str(e.get("id", "")))
        if t is not None and t["direction"] == "in":
            t["done"] = int(e.get("done") or 0)
            if t["state"] == "offered":
                t["state"] = "receiving"
        return None  # progress has its own events; no state event each time

    @staticmethod
    def _settle_out(t: dict) -> None:
        peers = t["peers"].values()
        if any(p == "sending" for p in peers):
            t["state"] = "sending"
        elif any(p == "waiting" for p in peers):
            t["state"] = "offered"
        else:
            t["state"] = "done"


def transfer_summary(t: dict) -> str:
    """One line about a transfer's state, for /files and the offer's own line."""
    if t["direction"] == "in":
        return {"offered": "waiting for your answer", "receiving":
                f"receiving, {format_size(t['done'])} of {format_size(t['size'])}",
                "received": f"saved as {t['path']}", "declined": "you declined it",
                "cancelled": f"stopped: {t['reason']}",
                "failed": f"failed: {t['reason']}"}.get(t["state"], t["state"])
    groups: dict[str, list[str]] = {}
    for nick, peer in sorted(t["peers"].items(), key=lambda p: nick_key(p[0])):
        groups.setdefault(peer, []).append(nick)
    words = {"waiting": "waiting for {}", "sending": "sending to {}",
             "received": "delivered to {}", "declined": "declined by {}",
             "cancelled": "cancelled for {}", "failed": "failed for {}"}
    parts = [words[p].format(", ".join(n)) for p, n in groups.items() if p in words]
    if t["state"] in ("failed", "cancelled") and t["reason"]:
        parts.append(t["reason"])
    if parts:
        return "; ".join(parts)
    return {"done": f"nobody else is in {t['nick']} to take it",
            "cancelled": "you cancelled it"}.get(t["state"], "waiting for answers")


class ChatClient:
    """The network side of both UIs: one connection, reconnected as needed."""

    def __init__(self, host: str, port: int, nick: str, on_event: Callable[[dict], None], *,
                 client: str = "pychat", history: bool = True, connect_attempts: int = 4,
                 give_up_after: float | None = None, password: str | None = None,
                 ssl_context: Any = None, ignored: set[str] | None = None):
        self.host, self.port = host, port
        self.password = password
        self.ssl_context = ssl_context
        self.ignored: set[str] = {nick_key(n) for n in ignored or ()}  # hidden, locally
        self.state = ClientState(nick)       # rooms, members, away, people, transfers
        self.my_away: str | None = None
        self.last_ids: dict[str, int] = {}   # room key -> newest message id shown there
        self._token: str | None = None       # from welcome: takes our nick back after a drop
        self.offers_in: dict[str, dict] = {}  # transfer id -> file_offer event, to answer
        self.incoming: dict[str, dict] = {}   # transfer id -> state of a file being received
        self.outgoing: dict[str, dict] = {}   # transfer id -> state of a file we offered
        self._offers: dict[str, dict] = {}    # cid -> file we offered, until the echo
        self.on_event = on_event
        self.client_name = client
        self.want_history = history
        self.connect_attempts = connect_attempts
        self.give_up_after = give_up_after   # seconds of failed reconnecting; None: never
        self.room = LOBBY                    # where send_msg goes (the UI's current room)
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
        self._answer: asyncio.Future | None = None
        self._wake = asyncio.Event()         # something was queued
        self._stop = asyncio.Event()         # quit() was called
        self._tokens = 0.0
        self._token_time = 0.0
        self._pump: asyncio.Task | None = None
        self._typing_sent = -TYPING_EVERY
        self._instance: Any = None
        self._had_history = False
        self._rejoin: list[dict] = []        # joins to send first after a reconnect
        self._current_before = LOBBY
        self._file_handlers: dict[str, Callable[[str, dict], bool]] = {
            "file_offer": self._on_file_offer, "file_accept": self._on_file_accept,
            "file_ack": self._on_file_ack, "file_chunk": self._on_file_chunk,
            "file_done": self._on_file_done, "file_decline": self._on_file_decline,
            "file_result": self._on_file_result, "file_cancel": self._on_file_cancel}
        self._trackers: dict[str, Callable[[dict], dict | None]] = {
            "history": self._track_history, "msg": self._track_message,
            "pm": self._track_message, "leave": self._track_leave, "error": self._track_error,
            "users_delta": self._track_users_delta}

    @property
    def nick(self) -> str:
        return self.state.nick

    @nick.setter
    def nick(self, nick: str) -> None:
        self.state.nick = nick

    @property
    def joined(self) -> dict[str, str]:
        """room key -> room name, for the rooms we are in."""
        return {nick_key(name): name for name in self.state.room_names()}

    @property
    def users(self) -> dict[str, str]:
        """nick key -> nick for the current room."""
        return {nick_key(n): n for n in self.state.members(self.room)}

    def where(self, ui: str, private: str | None = None) -> Where:
        """What plan_command needs to plan a line typed in this client."""
        return self.state.where(ui, self.room, private,
                                int(self.limits.get("max_text", MAX_TEXT)))

    # --- public methods (called by UIs)
    def send_msg(self, text: str, action: bool = False, room: str | None = None) -> str:
        """Queue a chat message; it stays in the outbox until the server echoes it."""
        cid = f"{self._cid_prefix}-{next(self._cid_counter)}"
        req: dict[str, Any] = {"type": "msg", "room": room or self.room, "text": text,
                               "cid": cid}
        return self._send_chat(req, action)

    def send_pm(self, to: str, text: str, action: bool = False) -> str:
        """Queue a private message; confirmed like a chat message."""
        cid = f"{self._cid_prefix}-{next(self._cid_counter)}"
        return self._send_chat({"type": "pm", "to": to, "text": text, "cid": cid}, action)

    def _send_chat(self, req: dict, action: bool) -> str:
        cid = req["cid"]
        if action:
            req["action"] = True
        self.outbox[cid] = req
        self._enqueue(req)
        self._outbox_changed()
        return cid

    def change_nick(self, nick: str) -> None:
        self._enqueue({"type": "nick", "nick": nick})

    def request(self, kind: str, **fields: Any) -> None:
        """Send any other request (join, part, rooms, topic, away, back, op, kick, ban,
        unban, mute, unmute); answers arrive as events."""
        if kind == "away":
            self.my_away = str(fields.get("message") or "")
        elif kind == "back":
            self.my_away = None
        self._enqueue({"type": kind, **fields})

    def switch_room(self, room: str) -> bool:
        """Make a joined room the current one (False if we are not in it)."""
        name = self.state.in_room(room)
        if name is None:
            return False
        self.room = name
        return True

    def ignore(self, nick: str, on: bool = True) -> None:
        """Hide (or show again) everything a nick says, in this client only."""
        (self.ignored.add if on else self.ignored.discard)(nick_key(nick))

    def set_password(self, password: str) -> None:
        """Answer a password_needed event."""
        self.password = password
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(self.nick)

    def request_users(self) -> None:
        self._enqueue({"type": "users", "room": self.room})

    def typing(self) -> None:
        """Tell the room we are typing (rate-limited here; dropped while offline)."""
        now = time.monotonic()
        if self.registered and now - self._typing_sent >= TYPING_EVERY:
            self._typing_sent = now
            self._enqueue({"type": "typing", "room": self.room})

    def set_nick(self, nick: str) -> None:
        """Answer a nick_rejected event with another nick to try."""
        self.nick = nick
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(nick)

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
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
        self._stop.set()

    # --- file transfer
    def send_file(self, path: str | Path, to: str | None = None,
                  room: str | None = None) -> str:
        """Offer a file to `to` (a nick) or to the current room; returns the cid.
        Raises OSError if the file cannot be read."""
        path = Path(path).expanduser()
        size = path.stat().st_size
        if not path.is_file():
            raise IsADirectoryError(f"{path} is not a file")
        digest = file_sha256(path)
        cid = f"{self._cid_prefix}-{next(self._cid_counter)}"
        req: dict[str, Any] = {"type": "file_offer", "name": path.name, "size": size,
                               "sha256": digest, "cid": cid}
        if to is not None:
            req["to"] = to
        else:
            req["room"] = room or self.room
        self._offers[cid] = {"path": path, "size": size, "name": path.name}
        self._enqueue(req)
        return cid

    def accept_file(self, tid: str, folder: str | Path | None = None) -> Path | None:
        """Accept an offered file into `folder` (Downloads by default); the path it
        is being written to (a .part file until verified), or None."""
        offer = self.offers_in.get(tid)
        if offer is None or tid in self.incoming:
            return None
        folder = Path(folder).expanduser() if folder else download_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if inside_folder(folder, offer["name"] + ".part") is None:
            # Cannot happen with a name from _file_event (safe_file_name); if
            # it ever does, the offer is refused, never written elsewhere.
            self.offers_in.pop(tid)
            self._enqueue({"type": "file_decline", "id": tid})
            self._emit({"type": "file_failed", "id": tid, "name": offer["name"],
                        "direction": "in", "nick": offer.get("from"),
                        "reason": f"refused: the name would be saved outside {folder}"})
            return None
        part, f = create_unique(folder, offer["name"] + ".part")
        self._changed(self.state.settle(tid, "receiving"))
        self.incoming[tid] = {"offer": offer, "file": f, "part": part, "folder": folder,
                              "hash": hashlib.sha256(), "received": 0,
                              "started": time.monotonic(), "shown": 0.0}
        self._enqueue({"type": "file_accept", "id": tid})
        return part

    def report_file_error(self, call: Callable[..., Any], name: str, *args: Any) -> None:
        """Run send_file or accept_file for a UI on another thread: a problem
        comes back as a file_failed event instead of an exception."""
        try:
            call(*args)
        except OSError as e:
            self._emit({"type": "file_failed", "id": "", "name": name, "nick": "",
                        "direction": "out" if call == self.send_file else "in",
                        "reason": f"{e.strerror or e}" + (f": {e.filename}" if e.filename
                                                          else "")})

    def decline_file(self, tid: str) -> bool:
        if self.offers_in.pop(tid, None) is None:
            return False
        self._enqueue({"type": "file_decline", "id": tid})
        self._changed(self.state.settle(tid, "declined"))
        return True

    def cancel_file(self, tid: str) -> bool:
        """Cancel a transfer in either direction (False if none is under way)."""
        if tid in self.incoming:
            self._changed(self.state.settle(tid, "cancelled", "you cancelled it"))
            self._end_incoming(tid, False, "you cancelled it")
            self._enqueue({"type": "file_cancel", "id": tid})
            return True
        shown = self.state.transfer(tid)
        if shown is not None and shown["state"] in FINAL:
            return False  # finished: nothing to stop
        out = self.outgoing.pop(tid, None)
        if out is None:
            return False
        self._changed(self.state.settle(tid, "cancelled", "you cancelled it"))
        for task in out["tasks"].values():
            task.cancel()
        self._enqueue({"type": "file_cancel", "id": tid})
        self._emit({"type": "file_failed", "id": tid, "name": out["name"], "direction": "out",
                    "nick": "", "reason": "you cancelled it"})
        return True

    def transfers_busy(self) -> bool:
        """Files we offered that someone may still accept or is still receiving,
        or files we are receiving."""
        return bool(self._offers or self.incoming or any(
            out["waiting"] or out["tasks"] for out in self.outgoing.values()))

    def _progress(self, tid: str, direction: str, nick: str, done: int, size: int,
                  started: float) -> None:
        elapsed = max(1e-6, time.monotonic() - started)
        speed = done / elapsed
        self._emit({"type": "file_progress", "id": tid, "direction": direction, "nick": nick,
                    "done": done, "size": size, "speed": speed,
                    "eta": (size - done) / speed if speed > 0 else None})

    def _file_event(self, event: dict) -> bool:
        """Handle a file_* event; False if the UI should not see it as it is."""
        handler = self._file_handlers.get(str(event.get("type")))
        return handler(str(event.get("id", "")), event) if handler is not None else True

    def _on_file_offer(self, tid: str, event: dict) -> bool:
        size = event.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or \
                not isinstance(event.get("sha256"), str):
            return False  # no offer we could check; the UIs would trip on it
        # The server cleans names, but a hostile one would not: from here on
        # every UI shows, and the client saves under, the safe name.
        event = dict(event, name=safe_file_name(str(event.get("name", ""))))
        cid = event.get("cid")
        mine = event.get("from") == self.nick and cid in self._offers
        if mine:
            info = self._offers.pop(cid)
            waiting = {str(n) for n in event.get("recipients") or []}
            self.outgoing[tid] = dict(info, id=tid, tasks={}, acks={}, waiting=waiting)
        else:
            self.offers_in[tid] = event
        self._emit(dict(event, mine=mine))
        return False

    def _on_file_accept(self, tid: str, event: dict) -> bool:
        out = self.outgoing.get(tid)
        nick = str(event.get("nick", ""))
        if out is not None and nick not in out["tasks"]:
            out["acks"][nick] = asyncio.Event()
            out["tasks"][nick] = asyncio.get_running_loop().create_task(
                self._stream_file(tid, nick))
        return True

    def _on_file_ack(self, tid: str, event: dict) -> bool:
        out = self.outgoing.get(tid)
        if out is not None and str(event.get("nick")) in out["acks"]:
            out.setdefault("acked", {}).setdefault(str(event["nick"]), 0)
            out["acked"][str(event["nick"])] += 1
            out["acks"][str(event["nick"])].set()
        return False

    def _on_file_chunk(self, tid: str, event: dict) -> bool:
        self._receive_chunk(tid, event)
        return False

    def _on_file_done(self, tid: str, event: dict) -> bool:
        self._finish_incoming(tid)
        return False

    def _answered(self, tid: str, event: dict) -> dict | None:
        """A receiver of our file is done with it: the offer, if still ours."""
        out = self.outgoing.get(tid)
        if out is not None:
            out["waiting"].discard(str(event.get("nick", "")))
        return out

    def _on_file_decline(self, tid: str, event: dict) -> bool:
        out = self._answered(tid, event)
        if out is not None and not out["waiting"] and not out["tasks"]:
            self.outgoing.pop(tid)
        return True

    def _on_file_result(self, tid: str, event: dict) -> bool:
        out = self._answered(tid, event)
        if out is not None and not out["waiting"] and not out["tasks"]:
            self.outgoing.pop(tid)
        self._emit({"type": "file_sent" if event.get("ok") else "file_failed", "id": tid,
                    "name": out["name"] if out else tid, "direction": "out",
                    "nick": event.get("nick"), "reason": event.get("reason", "")})
        return False

    def _on_file_cancel(self, tid: str, event: dict) -> bool:
        self._on_file_decline(tid, event)
        if tid in self.incoming:
            self._end_incoming(tid, False, str(event.get("reason") or "cancelled"))
        elif tid in self.offers_in:
            self.offers_in.pop(tid)
        out = self.outgoing.get(tid)
        nick = str(event.get("nick", ""))
        if out is not None and nick in out["tasks"]:
            out["tasks"].pop(nick).cancel()
        return True

    async def _stream_file(self, tid: str, nick: str) -> None:
        """Send the file to one receiver, at most FILE_WINDOW chunks ahead of its acks."""
        out = self.outgoing[tid]
        started, sent, seq = time.monotonic(), 0, 0
        shown = 0.0
        try:
            with open(out["path"], "rb") as f:
                while True:
                    data = f.read(FILE_CHUNK)
                    if not data and seq > 0 and sent >= out["size"]:
                        break
                    while seq - out.get("acked", {}).get(nick, 0) >= FILE_WINDOW:
                        out["acks"][nick].clear()
                        await out["acks"][nick].wait()
                    writer = self._writer
                    if writer is None:
                        raise ConnectionError("not connected")
                    writer.write(encode({"type": "file_chunk", "id": tid, "to": nick,
                                         "seq": seq, "data": base64.b64encode(data).decode()}))
                    await writer.drain()
                    seq += 1
                    sent += len(data)
                    if time.monotonic() - shown > 0.2 or sent >= out["size"]:
                        shown = time.monotonic()
                        self._progress(tid, "out", nick, sent, out["size"], started)
                    if not data:
                        break
            self._writer.write(encode({"type": "file_done", "id": tid, "to": nick}))
        except asyncio.CancelledError:
            raise
        except (OSError, ConnectionError, AttributeError) as e:
            out["waiting"].discard(nick)
            self._emit({"type": "file_failed", "id": tid, "name": out["name"], "direction": "out",
                        "nick": nick, "reason": str(e)})
        finally:
            out["tasks"].pop(nick, None)

    def _receive_chunk(self, tid: str, event: dict) -> None:
        state = self.incoming.get(tid)
        if state is None:
            return
        try:
            data = base64.b64decode(str(event.get("data", "")), validate=True)
            state["file"].write(data)
        except (ValueError, OSError) as e:
            self._end_incoming(tid, False, f"could not write it: {e}")
            self._enqueue({"type": "file_cancel", "id": tid, "reason": "receiver failed"})
            return
        state["hash"].update(data)
        state["received"] += len(data)
        size = state["offer"]["size"]
        if state["received"] > size:
            self._end_incoming(tid, False, "more data than offered")
            self._enqueue({"type": "file_cancel", "id": tid, "reason": "too much data"})
            return
        if self._writer is not None:  # acks skip the paced queue: they are flow control
            self._writer.write(encode({"type": "file_ack", "id": tid, "seq": event.get("seq")}))
        if time.monotonic() - state["shown"] > 0.2 or state["received"] >= size:
            state["shown"] = time.monotonic()
            self._progress(tid, "in", str(state["offer"].get("from")), state["received"], size,
                           state["started"])

    def _finish_incoming(self, tid: str) -> None:
        state = self.incoming.get(tid)
        if state is None:
            return
        offer = state["offer"]
        if state["received"] != offer["size"]:
            ok, reason = False, f"incomplete: {state['received']} of {offer['size']} bytes"
        elif state["hash"].hexdigest() != offer["sha256"]:
            ok, reason = False, "the SHA-256 does not match: corrupted on the way"
        else:
            ok, reason = True, ""
        reason = self._end_incoming(tid, ok, reason)  # saving can fail too
        req = {"type": "file_received", "id": tid, "ok": not reason}
        if reason:
            req["reason"] = reason
        self._enqueue(req)

    def _end_incoming(self, tid: str, ok: bool, reason: str) -> str:
        """Close a received file: keep it under its final name, or delete it.
        Returns why it was not kept ("" when it was)."""
        state = self.incoming.pop(tid)
        self.offers_in.pop(tid, None)
        state["file"].close()
        offer = state["offer"]
        final = None
        if ok:
            try:
                final, f = create_unique(state["folder"], offer["name"])
                f.close()
                os.replace(state["part"], final)
            except OSError as e:  # outside the folder (refused), or the disk said no
                reason = f"could not keep it: {e.strerror or e}"
                if final is not None:
                    final.unlink(missing_ok=True)
            else:
                self._emit({"type": "file_received", "id": tid, "name": offer["name"],
                            "path": str(final), "size": offer["size"],
                            "nick": offer.get("from"), "direction": "in"})
                return ""
        try:
            state["part"].unlink()
        except OSError:
            pass
        self._emit({"type": "file_failed", "id": tid, "name": offer["name"],
                    "direction": "in", "nick": offer.get("from"),
                    "reason": f"{reason}; the partial file was deleted"})
        return reason

    def _fail_transfers(self, reason: str) -> None:
        """The connection is gone, and with it every transfer (the server forgets
        them too)."""
        for tid in list(self.incoming):
            self._end_incoming(tid, False, reason)
        for tid, out in list(self.outgoing.items()):
            for nick, task in list(out["tasks"].items()):
                task.cancel()
                self._emit({"type": "file_failed", "id": tid, "name": out["name"],
                            "direction": "out", "nick": nick, "reason": reason})
        self.outgoing.clear()
        self.offers_in.clear()
        # Offers nobody took yet die with the connection too (and a restarted
        # server numbers transfers afresh): every UI shows them as ended.
        ended = [self.state.settle(t["id"], "failed", reason)
                 for t in self.state.transfer_list() if t["state"] not in FINAL]
        self._changed("transfers" if ended else None)

    # --- internals
    def _emit(self, event: dict) -> None:
        """Pass an event to the UI, after taking it into the state.  Events about
        this client itself (its messages, its nick, its joins) say "you": true,
        so the UIs never need to remember who they are."""
        kind = event.get("type")
        subject = event.get("old") if kind == "nick" else \
            event.get("from") if kind in ("msg", "pm") else event.get("nick")
        if kind in ABOUT_YOU and isinstance(subject, str) and \
                nick_key(subject) == nick_key(self.nick):
            event = dict(event, you=True)
        part = self.state.apply(event)
        self.on_event(event)
        self._changed(part)

    def _changed(self, part: str | None) -> None:
        """One event per change of the state, naming the part that changed."""
        if part is not None:
            self.on_event({"type": "state", "part": part})

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
            while rate > 0 and self.queue[0]["type"] != "typing":  # typing costs no token
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
            try:
                self._writer.write(encode(req))
                await self._writer.drain()
            except (ConnectionError, OSError, RuntimeError):
                return  # the reader notices the lost connection and reconnects

    async def run(self) -> None:
        """Connect, register, read events; reconnect until quit() or giving up."""
        failures = 0
        backoff = BACKOFF_START
        down_since: float | None = None
        while not self.closed:
            self._emit({"type": "status", "state": "connecting",
                        "message": f"Connecting to {self.host}:{self.port}..."})
            try:
                reader, writer = await self._open()
            except (OSError, asyncio.TimeoutError) as e:
                failures += 1
                down_since = down_since or time.monotonic()
                reason = self._cannot_connect(e, failures, down_since)
                if reason is None:
                    return  # gave up, and said why
                self._emit({"type": "status", "state": "disconnected",
                            "message": f"Cannot connect: {reason}. Retrying in {backoff:.1f} s."})
                await self._sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            if self.closed:  # quit() while we were connecting
                writer.close()
                break
            reason = await self._run_session(reader, writer)
            if self.closed:
                break
            if reason == "fatal":
                return
            if not self.ever_registered and reason.startswith("the server closed"):
                failures += 1  # e.g. a plain client at a TLS server: retrying will not help
                if failures >= self.connect_attempts:
                    hint = "" if self.ssl_context else " Does it need --tls (or --cafile)?"
                    self._fatal(f"{self.host}:{self.port} closed the connection before "
                                f"welcoming us.{hint}")
                    return
            if self.ever_registered:
                failures, backoff, down_since = 0, BACKOFF_START, time.monotonic()
            self._emit({"type": "status", "state": "disconnected",
                        "message": f"Disconnected: {reason}. Reconnecting..."})
            await self._sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
        self._emit({"type": "status", "state": "closed", "message": "Disconnected."})

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        tls: dict[str, Any] = {}
        if self.ssl_context is not None:
            tls = {"ssl": self.ssl_context, "server_hostname": self.host,
                   "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=CLIENT_MAX_LINE, **tls),
            CONNECT_TIMEOUT)
        pin = getattr(self.ssl_context, "pinned_sha256", None)
        if pin is not None:
            cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
            if hashlib.sha256(cert).hexdigest() != pin:
                writer.close()
                import ssl
                raise ssl.SSLError("pinned", "the server's certificate is not the one you "
                                   f"trusted ({fingerprint_text(pin)}): someone may be "
                                   "pretending to be it.")
        return reader, writer

    def _cannot_connect(self, e: Exception, failures: int, down_since: float) -> str | None:
        """Why connecting failed, to retry; None when it is time to give up
        (a fatal event has said why)."""
        if _is_tls_error(e):  # retrying cannot fix a certificate
            self._fatal(f"TLS with {self.host}:{self.port} failed: {tls_problem(e)}")
            return None
        errno = getattr(e, "errno", None)
        reason = (os.strerror(errno) if errno else None) or str(e) or "timed out"
        if not self.ever_registered and failures >= self.connect_attempts:
            self._fatal(f"Cannot connect to {self.host}:{self.port}: {reason}.")
            return None
        if (self.ever_registered and self.give_up_after is not None
                and time.monotonic() - down_since > self.give_up_after):
            self._fatal(f"Lost the server at {self.host}:{self.port} and could not "
                        f"reconnect for {self.give_up_after:.0f} s: {reason}.")
            return None
        return reason

    async def _run_session(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> str:
        """One connection's life; why it ended.  Whatever happens, what lived
        on it (the pump, transfers) ends with it."""
        self._writer = writer
        try:
            return await self._session(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            detail = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
            return f"connection lost ({detail or e.__class__.__name__})"
        finally:
            self.registered = False
            self._fail_transfers("the connection was lost")
            if self._pump is not None:
                self._pump.cancel()
                self._pump = None
            self._close_writer()

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
        ended = await self._register(reader, writer, self._hello())
        if ended is not None:
            return ended
        # Messages written on the last connection but never confirmed go first.
        queued = {id(r) for r in self.queue}
        resend = [r for r in self.outbox.values() if id(r) not in queued]
        self.queue.extendleft(reversed(self._rejoin + resend))
        self._rejoin = []
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
                if event.get("code") in ("kicked", "banned"):  # coming back would be rude
                    self._fatal(str(event.get("reason")))
                    return "fatal"
                return str(event.get("reason") or "the server said bye")

    def _hello(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"type": "hello", "nick": self.nick, "client": self.client_name,
                                 "features": ["users_delta"]}
        if self.password is not None:
            hello["password"] = self.password
        if self._token:  # back after a drop: our old connection may still hold the nick
            hello["token"] = self._token
        if self.last_ids:  # ...and we only need what we missed
            hello["instance"] = self._instance
            hello["after"] = {name: self.last_ids[key] for key, name in self.joined.items()
                              if key in self.last_ids}
        return hello

    async def _register(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        hello: dict[str, Any]) -> str | None:
        """Say hello and read until welcomed (None), or how the session ended.
        A taken nick or a wrong password is asked of the UI and tried again."""
        writer.write(encode(hello))
        rejoin_tries = 0
        while True:
            event = await self._read(reader)
            if event is None:
                return "the server closed the connection"
            kind, code = event.get("type"), event.get("code")
            if kind == "welcome":
                self.registered = True
                self._on_welcome(event)
                return None
            if kind == "error" and code == "nick_taken" and self.ever_registered \
                    and rejoin_tries < 20:
                # Our old connection may still be a ghost on the server
                # until it times out: try the same nick again shortly.
                rejoin_tries += 1
                self._emit({"type": "status", "state": "connecting",
                            "message": f"{event.get('message')} Waiting for it to free up..."})
                await self._sleep(min(BACKOFF_MAX, 1.0 * rejoin_tries))
            elif kind == "error" and code in ("nick_taken", "nick_invalid"):
                hello["nick"] = await self._ask_ui({
                    "type": "nick_rejected", "code": code,
                    "message": event.get("message", ""), "nick": self.nick})
            elif kind == "error" and code == "auth_failed":
                self.password = None  # never re-sent by itself after a reconnect
                await self._ask_ui({"type": "password_needed",
                                    "message": event.get("message", "")})
                hello["password"] = self.password or ""
            elif kind == "error" and code in ("auth_blocked", "banned"):
                self._fatal(str(event.get("message")))
                return "fatal"
            elif kind == "bye":
                return str(event.get("reason") or "the server said bye")
            elif kind == "ping":
                writer.write(encode({"type": "pong", "data": event.get("data")}))
                continue
            else:
                if kind not in LOCAL_EVENTS:
                    self._emit(event)
                continue
            if self.closed:
                return "closed"
            writer.write(encode(hello))  # again, with what changed

    async def _ask_ui(self, event: dict) -> str | None:
        """Tell the UI what the server refused and wait for its answer
        (set_nick or set_password); None if the client was closed meanwhile."""
        self._answer = asyncio.get_running_loop().create_future()
        self._emit(event)
        try:
            return await self._answer
        except asyncio.CancelledError:
            if self.closed:
                return None
            raise

    def _on_welcome(self, event: dict) -> None:
        self.nick = str(event.get("nick", self.nick))
        self._current_before = self.room
        self.room = str(event.get("room", LOBBY))
        limits = event.get("limits")
        self.limits = limits if isinstance(limits, dict) else {}
        instance = event.get("instance")
        if instance != self._instance:  # a restarted server numbers messages afresh
            self._instance = instance
            self.last_id = 0
            self.last_ids.clear()
        self._token = event.get("token") if isinstance(event.get("token"), str) else None
        first = not self.ever_registered
        self.ever_registered = True
        # Back after a reconnect: into the same rooms (before anything is re-sent
        # there), with the same away state, talking where we were.  A resumed
        # session is still in its rooms and still away.
        lobby = nick_key(self.room)
        kept = {nick_key(str(r)): str(r) for r in event.get("rooms") or []} \
            if event.get("resumed") else {lobby: self.room}
        self._rejoin = [dict({"type": "join", "room": name},
                             **({"after": self.last_ids[key]} if key in self.last_ids else {}))
                        for key, name in self.joined.items() if key not in kept]
        if self.my_away is not None and not event.get("resumed"):
            self._rejoin.append({"type": "away", "message": self.my_away})
        current = self._current_before
        self.state.welcome(self.nick, kept)
        if current and (nick_key(current) in kept or any(
                nick_key(r["room"]) == nick_key(current)
                for r in self._rejoin if r["type"] == "join")):
            self.room = current
        event = dict(event, first=first)
        self._emit({"type": "status", "state": "connected",
                    "message": f"Connected to {self.host}:{self.port} as {self.nick}."})
        self._emit(event)

    def _track(self, event: dict) -> None:
        """Keep the outbox and the last message ids, then pass the event on
        (the state takes it in on the way, in _emit)."""
        kind = event.get("type")
        if kind in LOCAL_EVENTS:
            return  # a server must not impersonate the client's own events
        if isinstance(kind, str) and kind.startswith("file_"):
            if isinstance(event.get("id"), str) and self._file_event(event):
                self._emit(event)
            return
        sender = nick_key(str(event.get("from") or event.get("nick") or ""))
        if kind in ("msg", "pm", "typing") and sender in self.ignored and \
                sender != nick_key(self.nick):
            return  # /ignore: hidden in this client
        tracker = self._trackers.get(str(kind))
        shown = tracker(event) if tracker is not None else event
        if shown is not None:
            self._emit(shown)

    def _track_history(self, event: dict) -> dict | None:
        messages = event.get("messages")
        if not isinstance(messages, list):
            return None
        room_key = nick_key(str(event.get("room") or ""))
        # After a reconnect show only what we have not seen in that room
        # yet; a room joined for the first time shows all of it.
        last = self.last_ids.get(room_key, -1)
        fresh = [m for m in messages if isinstance(m, dict)
                 and isinstance(m.get("id"), int) and m["id"] > last
                 and nick_key(str(m.get("from", ""))) not in self.ignored]
        if not self.want_history and not self._had_history:
            fresh = []  # --no-history skips the backlog, not what we miss later
        self._had_history = True
        self.last_ids[room_key] = max([last, 0] + [m["id"] for m in messages if isinstance(
            m, dict) and isinstance(m.get("id"), int)])
        self.last_id = max(self.last_id, self.last_ids[room_key])
        mine = [m.get("cid") for m in messages if isinstance(m, dict)
                and m.get("from") == self.nick and isinstance(m.get("cid"), str)]
        if any(self.outbox.pop(cid, None) is not None for cid in mine):
            self._outbox_changed()  # sent before the drop after all
        return dict(event, messages=fresh)

    def _track_message(self, event: dict) -> dict | None:
        cid = event.get("cid")
        if event.get("from") == self.nick and isinstance(cid, str):
            if self.outbox.pop(cid, None) is not None:
                self._outbox_changed()
        if isinstance(event.get("id"), int):
            self.last_id = max(self.last_id, event["id"])
            room_key = nick_key(str(event.get("room") or ""))
            if event.get("type") == "msg" and room_key:
                if event["id"] <= self.last_ids.get(room_key, 0):
                    return None  # shown already (a resend's echo, or history)
                self.last_ids[room_key] = event["id"]
        return event

    def _track_leave(self, event: dict) -> None:
        self._emit(event)
        if self.state.in_room(self.room) is None and \
                nick_key(str(event.get("nick", ""))) == nick_key(self.nick):
            self.room = next(iter(self.state.room_names()), LOBBY)  # we parted

    def _track_users_delta(self, event: dict) -> None:
        """A tick's joins and leaves in one room, in one event (our hello
        asked for them so): taken in and shown as the leave and join events
        it stands for, leaves first, so the UIs and the state know only those."""
        room, ts = event.get("room"), event.get("ts")
        for gone in event.get("left") or ():
            if isinstance(gone, dict) and isinstance(gone.get("nick"), str):
                self._track_leave(dict(gone, type="leave", room=room, ts=ts))
        away = event.get("away") if isinstance(event.get("away"), dict) else {}
        via = event.get("via") if isinstance(event.get("via"), dict) else {}
        for nick in event.get("joined") or ():
            if isinstance(nick, str):
                join = {"type": "join", "room": room, "nick": nick, "ts": ts}
                if isinstance(away.get(nick), str):
                    join["away"] = away[nick]
                if isinstance(via.get(nick), str):
                    join["via"] = via[nick]
                self._emit(join)

    def _track_error(self, event: dict) -> dict | None:
        if event.get("request") == "join" and self.state.in_room(self.room) is None:
            # A refused join: keep talking where we really are.
            self.room = next(iter(self.state.room_names()), LOBBY)
        cid = event.get("cid")
        if isinstance(cid, str) and cid in self.outbox:
            if event.get("code") == "rate_limited":
                self._resend_later(cid)
                return None
            req = self.outbox.pop(cid)
            self._emit({"type": "failed", "cid": cid, "text": req.get("text", ""),
                        "to": req.get("to"), "code": event.get("code"),
                        "message": event.get("message", "")})
            self._outbox_changed()
            return None
        return event

    def _outbox_changed(self) -> None:
        self._emit({"type": "outbox", "pending": [r["text"] for r in self.outbox.values()]})

    def _resend_later(self, cid: str) -> None:
        """The server dropped a paced message anyway: queue it again in a second."""
        def again() -> None:
            req = self.outbox.get(cid)
            if req is not None and req not in self.queue:
                self._enqueue(req)
        asyncio.get_running_loop().call_later(1.0, again)


class ClientThread:
    """A ChatClient on a private event loop in a daemon thread (for the GUI).

    Events come out through `events`, a queue.Queue the UI polls; calls go in
    through call_soon_threadsafe, the only legal way into another thread's loop.
    """

    def __init__(self, host: str, port: int, nick: str, **options: Any):
        self.events: queue.Queue[dict] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.client: ChatClient | None = None
        self._args = (host, port, nick, options)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pychat-net", daemon=True)

    def start(self) -> ClientThread:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        host, port, nick, options = self._args
        self.client = ChatClient(host, port, nick, self.events.put, **options)
        self._ready.set()
        try:
            self.loop.run_until_complete(self.client.run())
        except Exception as e:  # never let the thread die silently
            self.events.put({"type": "fatal", "message": f"Network error: {e}"})
        finally:
            self.loop.close()

    @property
    def state(self) -> ClientState:
        """The client's state, to read from the UI's thread."""
        assert self.client is not None, "start() makes the client"
        return self.client.state

    def _call(self, method: str, *args: Any) -> None:
        if self.client is None:
            return
        try:
            self.loop.call_soon_threadsafe(getattr(self.client, method), *args)
        except RuntimeError:  # loop already closed: the client is gone
            pass

    def send_msg(self, text: str, action: bool = False, room: str | None = None) -> None:
        self._call("send_msg", text, action, room)

    def send_pm(self, to: str, text: str, action: bool = False) -> None:
        self._call("send_pm", to, text, action)

    def request(self, kind: str, **fields: Any) -> None:
        if self.client is not None:
            try:
                self.loop.call_soon_threadsafe(lambda: self.client.request(kind, **fields))
            except RuntimeError:
                pass

    def set_password(self, password: str) -> None:
        self._call("set_password", password)

    def ignore(self, nick: str, on: bool = True) -> None:
        self._call("ignore", nick, on)

    def change_nick(self, nick: str) -> None:
        self._call("change_nick", nick)

    def request_users(self) -> None:
        self._call("request_users")

    def typing(self) -> None:
        self._call("typing")

    def send_file(self, path: str, to: str | None = None, room: str | None = None) -> None:
        if self.client is not None:
            self._call("report_file_error", self.client.send_file, Path(path).name, path, to,
                       room)

    def accept_file(self, tid: str, name: str, folder: Path | None) -> None:
        if self.client is not None:
            self._call("report_file_error", self.client.accept_file, name, tid, folder)

    def decline_file(self, tid: str) -> None:
        self._call("decline_file", tid)

    def cancel_file(self, tid: str) -> None:
        self._call("cancel_file", tid)

    def set_nick(self, nick: str) -> None:
        self._call("set_nick", nick)

    def close(self, timeout: float = 3.0, reason: str = "") -> None:
        """Quit cleanly and wait (bounded) for the thread to end."""
        if self.client is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.client.quit(reason), self.loop)
            except RuntimeError:
                pass
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()


# --- settings shared by the UIs (a small JSON file in the user's config folder)
def desktop_system() -> str:
    """"win32", "darwin" or "linux" (which stands for every freedesktop system)."""
    return "win32" if sys.platform == "win32" else "darwin" if sys.platform == "darwin" \
        else "linux"


def env_folder(env: Mapping[str, str], name: str, home: Path | None, default: str) -> Path:
    """A folder named by an environment variable (XDG_DATA_HOME, APPDATA...),
    else `default` in the home folder (looked up only then).  A relative value
    is ignored, as the XDG spec says."""
    value = env.get(name, "")
    if value and os.path.isabs(value):
        return Path(os.path.abspath(value))
    return (home or Path.home()) / default


def config_dir(system: str | None = None, home: Path | None = None,
               env: Mapping[str, str] | None = None) -> Path:
    """Where PyChat keeps its small files (the GUI's settings, the launcher
    record), per platform convention; this machine's unless told otherwise."""
    system = system or desktop_system()
    env = os.environ if env is None else env
    if system == "win32":
        return env_folder(env, "APPDATA", home, "AppData/Roaming") / "PyChat"
    if system == "darwin":
        return (home or Path.home()) / "Library" / "Application Support" / "PyChat"
    return env_folder(env, "XDG_CONFIG_HOME", home, ".config") / "pychat"


def load_settings(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(path: Path, settings: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    except OSError as e:
        log.warning("could not save settings to %s: %s", path, e)


# --- commands typed in either UI: one table, one planner
#
# Both the terminal and the window turn a typed line into a Plan with
# plan_command(line, where): a pure function, tested without Tk or a
# terminal.  Each UI then carries the plan out with its own do_<plan.do>
# method.  The help of both UIs is made from COMMANDS.

@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    args: str                  # what follows the name, as shown in the help
    help: str
    uis: tuple[str, ...] = ("cli", "gui", "web")  # terminal, window, browser page
    aliases: tuple[str, ...] = ()


COMMANDS = (
    Command("msg", "NICK TEXT", "a private message", uis=("cli", "gui"), aliases=("query",)),
    Command("msg", "NICK [TEXT]", "talk privately with NICK (opens the conversation)",
            uis=("gui", "web"), aliases=("query",)),
    Command("me", "ACTION", "say something in the third person (* alice waves)"),
    Command("join", "#ROOM", "join (or create) a room and talk there"),
    Command("room", "[#ROOM]", "switch between the rooms you are in (or list them)",
            aliases=("switch",)),
    Command("part", "[#ROOM] [WHY]", "leave a room (the current one by default)"),
    Command("close", "", "close the private conversation on show", uis=("gui", "web")),
    Command("rooms", "", "list the rooms with their people and topics"),
    Command("who", "", "list who is in the current room"),
    Command("whois", "NICK", "who someone is: rooms, away, which server"),
    Command("stats", "", "this server's counts, and its link to others"),
    Command("topic", "[TEXT]", "show or set the current room's topic"),
    Command("nick", "NEW", "change your nick"),
    Command("away", "[MESSAGE]", "mark yourself away"),
    Command("back", "", "you are back"),
    Command("send", "[NICK] PATH", 'offer a file here or to NICK ("quote paths" with spaces)',
            uis=("cli",)),
    Command("send", "[NICK] [PATH]", "offer a file here, or to NICK (no PATH: choose one)",
            uis=("gui",)),
    Command("send", "[NICK]", "choose a file to offer here, or to NICK (or drop it on the page)",
            uis=("web",)),
    Command("accept", "ID", "accept a file offered to you"),
    Command("decline", "ID", "decline a file offered to you"),
    Command("cancel", "ID", "stop a transfer"),
    Command("files", "", "files offered to you and transfers under way"),
    Command("ignore", "[NICK]", "hide someone here, saved (no NICK: who is hidden)"),
    Command("unignore", "NICK", "show someone again"),
    Command("op", "PASSWORD", "become a server operator, for:"),
    Command("kick", "NICK [WHY]", "put someone out of the chat"),
    Command("ban", "NICK [MINUTES]", "keep someone out (for good without MINUTES)"),
    Command("unban", "NICK", "let someone back in"),
    Command("mute", "NICK [WHY]", "stop someone from talking"),
    Command("unmute", "NICK", "let someone talk again"),
    Command("help", "", "this list"),
    Command("quit", "[REASON]", "leave (Ctrl-D and Ctrl-C work too)", uis=("cli",),
            aliases=("exit",)),
    Command("quit", "[REASON]", "leave and close the window", uis=("gui",), aliases=("exit",)),
    Command("quit", "[REASON]", "leave the chat (the page offers to join again)", uis=("web",),
            aliases=("exit",)),
)

HELP_FOOTER = {
    "cli": [("//TEXT", "send a message that starts with a slash"),
            ("Tab", "complete commands, nicks, rooms, paths after /send")],
    "gui": [("//TEXT", "send a message that starts with a slash"),
            ("Enter", "send; Shift+Enter starts a new line; Up recalls what you sent"),
            ("Tab", "complete nicks; double-click someone to talk privately")],
    "web": [("//TEXT", "send a message that starts with a slash"),
            ("Enter", "send; Shift+Enter starts a new line; Up recalls what you sent"),
            ("Tab", "complete nicks; tap someone in the list to talk privately")],
}


def command_for(name: str, ui: str) -> Command | None:
    name = name.lower()
    return next((c for c in COMMANDS if ui in c.uis and (c.name == name or name in c.aliases)),
                None)


def command_names(ui: str) -> list[str]:
    """Every "/name" a UI understands, aliases too, sorted (for completion)."""
    return sorted({f"/{n}" for c in COMMANDS if ui in c.uis for n in (c.name, *c.aliases)})


def help_rows(ui: str) -> list[tuple[str, str]]:
    """(usage, what it does) for every command the UI has, then its keys."""
    rows = [(f"/{c.name} {c.args}".rstrip(), c.help) for c in COMMANDS if ui in c.uis]
    return rows + HELP_FOOTER[ui]


WEB_COMMANDS_MARK = "/*COMMANDS*/null"  # where WEB_JS takes the table (section 3c)


def web_commands() -> dict:
    """The browser page's commands and keys, as its /help shows them."""
    return {"commands": [{"name": c.name, "aliases": list(c.aliases), "args": c.args,
                          "help": c.help} for c in COMMANDS if "web" in c.uis],
            "footer": HELP_FOOTER["web"]}


def web_js() -> bytes:
    """WEB_JS with the command table filled in: the page's command names and
    /help come from COMMANDS, like the terminal's and the window's."""
    table = json.dumps(web_commands(), ensure_ascii=False, separators=(",", ":"))
    return WEB_JS.replace(WEB_COMMANDS_MARK, table, 1).encode("utf-8")


# Like the ding and the icon, the table is added to section 3c's files from here.
WEB_FILES["/app.js"] = ("text/javascript; charset=utf-8", web_js)


def help_text(ui: str) -> str:
    """The help as plain text in two columns (for a terminal's fixed font)."""
    rows = help_rows(ui)
    width = max(len(usage) for usage, _ in rows) + 2
    return "Commands:\n" + "\n".join(f"  {usage:<{width}}{what}" for usage, what in rows)


def usage(name: str, ui: str) -> str:
    c = command_for(name, ui)
    return f"Usage: /{c.name} {c.args}".rstrip() if c else ""


def split_args(text: str) -> list[str]:
    """Words of a command's arguments: "quoted words" and 'these' stay one,
    and a backslash keeps a space or a quote in the word (big\\ file.pdf).
    Other backslashes are left alone, so Windows paths need no doubling.
    Raises ValueError for an unclosed quote."""
    words: list[str] = []
    word: list[str] | None = None
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
            else:
                word = (word or []) + [ch]
        elif ch == "\\" and i + 1 < len(text) and text[i + 1] in " \t\"'":
            word = (word or []) + [text[i + 1]]
            i += 1
        elif ch in "\"'":
            quote = ch
            word = word or []
        elif ch.isspace():
            if word is not None:
                words.append("".join(word))
                word = None
        else:
            word = (word or []) + [ch]
        i += 1
    if quote:
        raise ValueError(f"the {quote} quote is not closed")
    if word is not None:
        words.append("".join(word))
    return words


@dataclasses.dataclass(frozen=True)
class Where:
    """What plan_command knows of the client a line was typed in."""
    ui: str                          # "cli" or "gui"
    room: str                        # the room talked in (the current one)
    private: str | None = None       # the window's private conversation on show
    rooms: tuple[str, ...] = ()      # rooms we are in
    nicks: tuple[str, ...] = ()      # people in our rooms
    gone: frozenset = frozenset()    # nick keys of private partners who left
    max_text: int = MAX_TEXT


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a typed line asks the UI to do: its do_<do>(**args) method."""
    do: str
    args: dict = dataclasses.field(default_factory=dict)
    note: str = ""                   # a warning to show first


def _error(text: str, lost: bool = False) -> Plan:
    """A refusal; `lost` when what was typed was meant to go out (a script's
    exit status then says so)."""
    return Plan("error", {"text": text, "lost": lost})


def plan_command(line: str, where: Where) -> Plan:
    """The plan for one typed line (never raises; problems are error plans)."""
    if line.lstrip().startswith("/") and not line.lstrip().startswith("//"):
        line = line.strip()
    if line.startswith("//"):
        return _say(line[1:], False, where)
    if not line.startswith("/") or len(line) == 1:
        return _say(line, False, where) if line.strip() else Plan("nothing")
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    command = command_for(name, where.ui)
    if command is None:
        return _error(f"Unknown command /{name}. Type /help for the list.")
    planner = _PLANNERS.get(command.name)
    if planner is not None:
        return planner(arg, where)
    return _request(command.name, arg, where)


def _say(text: str, action: bool, where: Where) -> Plan:
    if len(text) > where.max_text:
        return _error(f"Not sent: {len(text)} characters, the server allows {where.max_text}.",
                      lost=True)
    to = where.private
    note = ""
    if to is not None and nick_key(to) in where.gone:
        note = f"{to} has left the chat; sending anyway in case they are back."
    return Plan("say", {"text": text, "action": action, "to": to, "room": where.room}, note)


def _plan_me(arg: str, where: Where) -> Plan:
    return _say(arg, True, where) if arg else _error(usage("me", where.ui))


def _plan_msg(arg: str, where: Where) -> Plan:
    nick, _, text = arg.partition(" ")
    text = text.strip()
    if not nick or (not text and where.ui == "cli"):
        return _error(usage("msg", where.ui))
    if not text:
        return Plan("query", {"nick": nick})
    plan = _say(text, False, dataclasses.replace(where, private=nick))
    return dataclasses.replace(plan, args=dict(plan.args, open=True))


def _plan_nick(arg: str, where: Where) -> Plan:
    problem = nick_problem(arg) if arg else usage("nick", where.ui)
    return _error(problem) if problem else Plan("nick", {"nick": arg})


def _plan_join(arg: str, where: Where) -> Plan:
    room = arg.split()[0] if arg else ""
    problem = room_problem(room) if room else usage("join", where.ui)
    return _error(problem) if problem else Plan("join", {"room": room})


def _plan_room(arg: str, where: Where) -> Plan:
    if not arg:
        return Plan("show", {"text": f"You are talking in {where.room}; you are in "
                                     f"{', '.join(where.rooms) or 'no room'}."})
    room = arg.split()[0]
    joined = next((r for r in where.rooms if nick_key(r) == nick_key(room)), None)
    if joined is None:
        return _error(f"You are not in {room}; /join it first.")
    return Plan("switch", {"room": joined})


def _plan_part(arg: str, where: Where) -> Plan:
    if where.private is not None and not arg:
        return Plan("close")
    first, _, rest = arg.partition(" ")
    room = first if first.startswith(("#", "&")) else where.room
    reason = rest.strip() if first.startswith(("#", "&")) else arg
    return Plan("request", {"kind": "part", "fields": {"room": room, **(
        {"reason": reason} if reason else {})}})


def _plan_close(arg: str, where: Where) -> Plan:
    if where.private is None:
        return _error("/close closes a private conversation; use /part to leave a room.")
    return Plan("close")


def _plan_topic(arg: str, where: Where) -> Plan:
    if where.private is not None:
        return _error("Topics belong to rooms; this is a private conversation.")
    return Plan("request", {"kind": "topic", "fields": {"room": where.room, **(
        {"topic": arg} if arg else {})}})


def _plan_send(arg: str, where: Where) -> Plan:
    """/send PATH, /send NICK PATH; quotes or backslashes keep spaces in a path."""
    if not arg:
        return Plan("pick_file") if where.ui == "gui" else _error(usage("send", where.ui))
    if Path(arg).expanduser().is_file():  # a bare path with spaces, unquoted
        return Plan("send_file", {"path": arg, "to": where.private})
    try:
        words = split_args(arg)
    except ValueError as e:
        return _error(f"Cannot read that path: {e}.", lost=True)
    if len(words) == 1:
        return Plan("send_file", {"path": words[0], "to": where.private})
    first, path = words[0], " ".join(words[1:])
    nick = next((n for n in where.nicks if nick_key(n) == nick_key(first)), None)
    if nick is None and where.private and nick_key(where.private) == nick_key(first):
        nick = where.private
    if nick is None:
        if Path(" ".join(words)).expanduser().exists():
            return Plan("send_file", {"path": " ".join(words), "to": where.private})
        return _error(f"Nobody called {first} is in your rooms, and there is no file "
                      f"{arg}. For a path with spaces use quotes: /send \"my file.pdf\".",
                      lost=True)
    return Plan("send_file", {"path": path, "to": nick})


def _plan_transfer(name: str) -> Callable[[str, Where], Plan]:
    def plan(arg: str, where: Where) -> Plan:
        tid = arg.split()[0] if arg else ""
        if not tid:
            return _error(f"{usage(name, where.ui)} (/files lists them)")
        return Plan(name, {"tid": tid})
    return plan


def _plan_ignore(name: str) -> Callable[[str, Where], Plan]:
    def plan(arg: str, where: Where) -> Plan:
        nick = arg.split()[0] if arg else ""
        if not nick:
            return Plan("ignores") if name == "ignore" else _error(usage(name, where.ui))
        return Plan("ignore", {"nick": nick, "on": name == "ignore"})
    return plan


def _request(name: str, arg: str, where: Where) -> Plan:
    """Commands that are one request to the server."""
    first, _, rest = arg.partition(" ")
    rest = rest.strip()
    fields: dict[str, Any]
    if name in ("rooms", "back", "stats"):
        fields = {}
    elif name == "away":
        fields = {"message": arg}
    elif name == "op":
        if not arg:
            return _error(usage(name, where.ui))
        fields = {"password": arg}
    elif name == "ban":
        if not first:
            return _error(usage(name, where.ui))
        try:
            minutes = float(rest) if rest else None
        except ValueError:
            return _error(f"{usage(name, where.ui)} (MINUTES is a number)")
        fields = {"nick": first, **({"minutes": minutes} if minutes else {})}
    else:  # kick, mute, unban, unmute: a nick, maybe a reason
        if not first:
            return _error(usage(name, where.ui))
        fields = {"nick": first, **({"reason": rest} if rest and name in ("kick", "mute")
                                    else {})}
    return Plan("request", {"kind": name, "fields": fields})


_PLANNERS: dict[str, Callable[[str, Where], Plan]] = {
    "me": _plan_me, "msg": _plan_msg, "nick": _plan_nick, "join": _plan_join,
    "room": _plan_room, "part": _plan_part, "close": _plan_close, "topic": _plan_topic,
    "send": _plan_send, "accept": _plan_transfer("accept"),
    "decline": _plan_transfer("decline"), "cancel": _plan_transfer("cancel"),
    "ignore": _plan_ignore("ignore"), "unignore": _plan_ignore("unignore"),
    "who": lambda arg, where: Plan("who", {"room": where.room}),
    "files": lambda arg, where: Plan("files"),
    "help": lambda arg, where: Plan("help", {"rows": help_rows(where.ui)}),
    "quit": lambda arg, where: Plan("quit", {"reason": arg}),
}


def typing_counts(line: str) -> bool:
    """Whether a draft will go out as a message, so "typing" may be said about
    it: plain text and /me, never other commands."""
    stripped = line.lstrip()
    if not line.strip():
        return False
    if stripped.startswith("//") or not stripped.startswith("/"):
        return True
    name = stripped[1:].split(" ", 1)[0].lower()
    return name == "me" and " " in stripped and bool(stripped.split(" ", 1)[1].strip())


# ===========================================================================
# 5. Sound -- the ding: synthesised with `wave`, played by the platform's
#    player in a worker thread, never blocking and never raising.  Uses:
#    constants.
# ===========================================================================

DING_FILE = "ding.wav"


def make_ding(path: Path, seconds: float = 0.25, rate: int = 44100, freq: float = 880.0) -> Path:
    """Write PyChat's chime (a soft bell at A5 with two partials) as 16-bit mono WAV."""
    n, attack = int(seconds * rate), int(0.004 * rate)  # 4 ms fade-in: no click
    frames = bytearray()
    for i in range(n):
        t = i / rate
        env = math.exp(-t * 14.0) * (i / attack if i < attack else 1.0)
        tail = min(1.0, (n - i) / (0.02 * rate))  # 20 ms fade-out: no click
        sample = (math.sin(2 * math.pi * freq * t)
                  + 0.45 * math.sin(4 * math.pi * freq * t) * math.exp(-t * 10)
                  + 0.25 * math.sin(6 * math.pi * freq * t) * math.exp(-t * 20))
        value = max(-1.0, min(1.0, 0.5 * env * tail * sample / 1.7))
        frames += struct.pack("<h", int(value * 32767))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return path


def ding_path() -> Path | None:
    """ding.wav beside pychat.py, or the same chime synthesised into a temp file."""
    beside = Path(__file__).resolve().with_name(DING_FILE)
    if beside.is_file():
        return beside
    global _made_ding
    if _made_ding is None or not _made_ding.is_file():
        try:  # a private new file: never a predictable name in a shared folder
            fd, name = tempfile.mkstemp(prefix="pychat-", suffix=".wav")
            os.close(fd)
            _made_ding = make_ding(Path(name))
        except OSError:
            return None
    return _made_ding


_made_ding: Path | None = None


def ding_wav() -> bytes | None:
    """The ding's bytes, as the desktop client plays them (None: none to be had)."""
    path = ding_path()
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None


WEB_FILES["/ding.wav"] = ("audio/wav", ding_wav)  # the web page's chime (section 3c)


def player_commands(path: Path) -> list[list[str]]:
    """Command lines that can play a WAV file here, best first."""
    if sys.platform == "darwin":
        names = [["afplay", str(path)]]
    else:
        names = [["paplay", str(path)], ["aplay", "-q", str(path)]]
    return [cmd for cmd in names if shutil.which(cmd[0])]


class Notifier:
    """Plays the ding in a worker thread; at most one at a time.

    The worker only sets `needs_bell` when every player failed; the UI thread
    polls it and rings its own bell (Tk must not be touched from the worker).
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.muted = False
        self.needs_bell = False
        self.plays = 0
        self._busy = threading.Lock()

    def ding(self) -> None:
        if self.muted:
            return
        if not self._busy.acquire(blocking=False):
            return  # a ding is already playing: a flood of messages is one ding
        self.plays += 1
        threading.Thread(target=self._play, name="pychat-ding", daemon=True).start()

    def _play(self) -> None:
        try:
            path = self.path or ding_path()
            if path is None:
                self.needs_bell = True
            elif sys.platform == "win32":
                import winsound  # Windows only
                winsound.PlaySound(str(path), winsound.SND_FILENAME | winsound.SND_NODEFAULT)
            else:
                for cmd in player_commands(path):
                    try:
                        done = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, timeout=5)
                    except (OSError, subprocess.TimeoutExpired):
                        continue
                    if done.returncode == 0:
                        return
                self.needs_bell = True
        except Exception:  # a sound must never break the chat
            self.needs_bell = True
        finally:
            self._busy.release()


# ===========================================================================
# 6. Terminal client -- run_cli() and its helpers.  Uses: constants,
#    protocol, client core.  Only this section and the entry point print.
#
# On a terminal a daemon thread reads the keys itself (termios raw mode, or
# msvcrt on Windows) into a LineEditor, and hands each typed line to the event
# loop with call_soon_threadsafe.  Every screen write (incoming lines, the
# prompt and typed text, completion lists) happens under Terminal.lock:
# incoming lines are printed above the prompt, then the prompt plus the partly
# typed line are drawn again below them.  Piped stdin is read line by line.
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


def _width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK, emoji) characters count twice."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


# Rows after the first of one message (a newline in it, or wrapping) start
# this far in, past "HH:MM ", so they can never pass for a line of their own.
CONTINUATION_INDENT = 6


def wrap_rows(line: str, columns: int, indent: int = CONTINUATION_INDENT) -> list[str]:
    """One line (no newline in it) cut into rows narrower than `columns`, so the
    terminal never wraps it by itself; every row after the first starts with
    `indent` spaces.  Otherwise a peer could pad a message with spaces until
    the terminal's own wrap starts a row at column 0 with a fake "00:30 <alice>
    ...".  Breaks after a space where it can; escape sequences (our colours)
    take no room; a tab becomes the spaces it would advance."""
    limit = max(columns - 1, indent + 8)  # the last column is left free: no auto-wrap
    if "\t" not in line and _width(line) <= limit:  # most lines (escapes overcounted: safe)
        return [line]
    rows: list[str] = []
    row: list[tuple[str, int]] = []      # (text, width) pieces of the row so far
    col = 0
    for piece in re.split(f"({_ESCAPE_RE.pattern})", line):
        if piece.startswith(("\x1b", "\x9b")):
            row.append((piece, 0))
            continue
        for ch in piece:
            for c in (" " * (8 - col % 8) if ch == "\t" else ch):
                w = _width(c)
                if col + w > limit:  # a new row: after the last space if what
                    cut = len(row)   # follows it fits there, else hard at the edge
                    text_from = 1 if rows else 0  # a continuation row's piece 0 is the indent
                    spaces = [i for i, (t, _) in enumerate(row) if t == " " and i > text_from]
                    if spaces and indent + sum(n for _, n in row[spaces[-1] + 1:]) + w <= limit:
                        cut = spaces[-1] + 1
                    rows.append("".join(t for t, _ in row[:cut]))
                    row = [(" " * indent, indent)] + row[cut:]
                    col = sum(n for _, n in row)
                row.append((c, w))
                col += w
    rows.append("".join(t for t, _ in row))
    return rows


def enable_windows_ansi() -> bool:
    """Turn on escape-sequence processing in a Windows console (a no-op elsewhere)."""
    if sys.platform != "win32":
        return True
    try:
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.GetStdHandle(-11)  # STD_OUTPUT_HANDLE
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))  # VT processing
    except Exception:  # old Windows or no console: plain output then
        return False


def nick_colour(nick: str) -> int:
    """A stable ANSI colour code for a nick (the same on every machine)."""
    return NICK_COLOURS[zlib.crc32(nick_key(nick).encode("utf-8")) % len(NICK_COLOURS)]


def clock(ts: Any) -> str:
    """HH:MM in local time for an epoch timestamp (now if missing)."""
    try:
        return time.strftime("%H:%M", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return time.strftime("%H:%M")


def complete_nick(prefix: str, nicks: list[str]) -> list[str]:
    """Nicks starting with `prefix`, case-insensitively, sorted."""
    p = nick_key(prefix)
    return sorted((n for n in nicks if nick_key(n).startswith(p)), key=nick_key)


# --- the line editor: one writer owns the prompt rows
#
# The interactive client reads keys itself (termios raw mode, or msvcrt on
# Windows) instead of letting GNU readline echo from the stdin thread: every
# write to the screen -- an incoming line, the prompt and the typed text, a
# completion list -- then happens under Terminal.lock, so none can interleave.

INPUT_HISTORY_LEN = 500        # typed lines Up/Down can bring back
ESC_WAIT = 0.05                # seconds a lone ESC waits to become an arrow key's sequence
PASTE_TAB = "    "             # a pasted tab: the draft has no tab stops to line up

# Keys that arrive as escape sequences are named by their canonical sequence;
# LineEditor.feed() treats any other string longer than one character as text.
KEY_UP, KEY_DOWN, KEY_RIGHT, KEY_LEFT = "\x1b[A", "\x1b[B", "\x1b[C", "\x1b[D"
KEY_HOME, KEY_END, KEY_DELETE = "\x1b[H", "\x1b[F", "\x1b[3~"
_KEY_FINALS = {"A": KEY_UP, "B": KEY_DOWN, "C": KEY_RIGHT, "D": KEY_LEFT, "H": KEY_HOME,
               "F": KEY_END}
_KEY_TILDES = {"1": KEY_HOME, "7": KEY_HOME, "4": KEY_END, "8": KEY_END, "3": KEY_DELETE}
_KEY_SEQ_RE = re.compile(r"\x1b(?:\[([0-?]*)[ -/]*([@-~])|O([@-~]))")
_KEY_PREFIX_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|O)?")
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


class KeyDecoder:
    """Terminal input text to keys: characters, and KEY_* names for escape
    sequences.  Inside a bracketed paste (ESC[200~ ... ESC[201~) text comes out
    as literal runs, each line ending in "\\r", so a pasted Tab or escape is
    never taken for a key."""

    def __init__(self) -> None:
        self.pending = ""    # the start of an escape sequence cut by the read
        self.pasting = False

    def feed(self, text: str) -> list[str]:
        data, self.pending = self.pending + text, ""
        keys: list[str] = []
        i = 0
        while i < len(data):
            if data[i] == "\x1b":
                m = _KEY_SEQ_RE.match(data, i)
                if m is None:
                    if _KEY_PREFIX_RE.fullmatch(data, i):  # more may follow
                        self.pending = data[i:]
                        break
                    i += 1  # Alt+key and the like: the ESC is dropped
                    continue
                i = m.end()
                if m.group() in (PASTE_START, PASTE_END):
                    self.pasting = m.group() == PASTE_START
                elif not self.pasting:
                    params, final = m.group(1) or "", m.group(2) or m.group(3)
                    key = _KEY_TILDES.get(params.split(";")[0]) if final == "~" \
                        else _KEY_FINALS.get(final)
                    if key:
                        keys.append(key)
                continue
            if not self.pasting:
                keys.append(data[i])
                i += 1
                continue
            end = data.find("\x1b", i)
            end = len(data) if end < 0 else end
            chunk = data[i:end].replace("\r\n", "\r").replace("\n", "\r")
            for j, line in enumerate(chunk.split("\r")):
                if j:
                    keys.append("\r")
                text_run = "".join(PASTE_TAB if c == "\t" else c for c in line
                                   if c == "\t" or not _UNSAFE_RE.match(c))
                if text_run:
                    keys.append(text_run)
            i = end
        return keys

    def flush(self) -> list[str]:
        """The keys held back for an escape sequence that never completed."""
        data, self.pending = self.pending, ""
        return ["\x1b"] if data == "\x1b" else []


class LineEditor:
    """The line being typed, as a state machine with no terminal: feed() takes
    one key and answers what happened, (action, line), where action is "edit",
    "submit" (line is the typed line), "eof" (Ctrl-D on an empty line) or
    "list" (Tab found several completions: they are in `matches`).  Ctrl-C
    raises KeyboardInterrupt.  `complete(before_cursor)` returns candidates,
    each a whole new text for before the cursor."""

    def __init__(self, complete: Callable[[str], list[str]] | None = None,
                 history_len: int = INPUT_HISTORY_LEN):
        self.chars: list[str] = []
        self.point = 0                     # the cursor, an index into chars
        self.history: list[str] = []
        self.history_len = history_len
        self.back = 0                      # how far Up has gone into history (0: the draft)
        self.draft: list[str] = []         # what was typed before Up
        self.complete = complete
        self.matches: list[str] = []

    def buffer(self) -> str:
        return "".join(self.chars)

    def _set(self, text: str | list[str], point: int | None = None) -> None:
        self.chars = list(text)
        self.point = len(self.chars) if point is None else point

    def _recall(self, back: int) -> None:
        if self.back == 0:
            self.draft = self.chars
        self.back = back
        self._set(self.draft if back == 0 else self.history[-back])

    def feed(self, key: str) -> tuple[str, str]:
        chars, point = self.chars, self.point
        if key in ("\r", "\n"):
            line = self.buffer()
            if line.strip() and (not self.history or self.history[-1] != line):
                self.history = (self.history + [line])[-self.history_len:]
            self._set("")
            self.back, self.draft = 0, []
            return "submit", line
        if key == "\x03":
            raise KeyboardInterrupt
        if key == "\x04" and not chars:
            return "eof", ""
        if key == "\t":
            return self._complete()
        if key in ("\x7f", "\x08"):        # Backspace (DEL from most terminals, ^H from some)
            if point:
                del chars[point - 1]
                self.point -= 1
        elif key in (KEY_DELETE, "\x04"):
            del chars[point:point + 1]
        elif key in (KEY_LEFT, "\x02"):
            self.point = max(0, point - 1)
        elif key in (KEY_RIGHT, "\x06"):
            self.point = min(len(chars), point + 1)
        elif key in (KEY_HOME, "\x01"):
            self.point = 0
        elif key in (KEY_END, "\x05"):
            self.point = len(chars)
        elif key == "\x15":                # Ctrl-U: erase to the start
            self._set(chars[point:], 0)
        elif key == "\x0b":                # Ctrl-K: erase to the end
            del chars[point:]
        elif key == "\x17":                # Ctrl-W: erase the word before the cursor
            start = point
            while start and chars[start - 1] == " ":
                start -= 1
            while start and chars[start - 1] != " ":
                start -= 1
            self._set(chars[:start] + chars[point:], start)
        elif key in (KEY_UP, "\x10"):
            if self.back < len(self.history):
                self._recall(self.back + 1)
        elif key in (KEY_DOWN, "\x0e"):
            if self.back:
                self._recall(self.back - 1)
        elif not key.startswith("\x1b") and (len(key) > 1 or not _UNSAFE_RE.match(key)):
            chars[point:point] = list(key)  # typed text, or a pasted run
            self.point += len(key)
        return "edit", ""

    def _complete(self) -> tuple[str, str]:
        before = "".join(self.chars[:self.point])
        matches = self.complete(before) if self.complete else []
        if not matches:
            return "edit", ""
        common = matches[0] if len(matches) == 1 else os.path.commonprefix(matches)
        if len(common) > len(before):
            self._set(list(common) + self.chars[self.point:], len(common))
        if len(matches) == 1:
            return "edit", ""
        self.matches = matches
        return "list", ""


def completion_names(matches: list[str]) -> list[str]:
    """What to list for several completions: each one's last word (or path part)."""
    common = os.path.commonprefix(matches)
    cut = max(common.rfind(c) for c in " /\\\"") + 1
    return [m[cut:].rstrip(": ") or m for m in matches]


def complete_path(typed: str) -> list[str]:
    """Paths starting with `typed` (~ expanded for the lookup, kept as typed),
    folders ending in a separator.  A path with a space is quoted the way it
    was begun: "in quotes" when `typed` opens one (always on Windows, where a
    backslash is a separator), else with backslash-escaped spaces."""
    quoted = typed.startswith('"') or sys.platform == "win32"
    raw = typed[1:].rstrip('"') if typed.startswith('"') else typed.replace("\\ ", " ")
    cut = max(raw.rfind("/"), raw.rfind(os.sep)) + 1
    folder, start = raw[:cut], raw[cut:]
    try:
        entries = sorted(Path(os.path.expanduser(folder) or ".").iterdir())
    except (OSError, ValueError):
        return []
    found = []
    for entry in entries:
        name = entry.name
        if not os.path.normcase(name).startswith(os.path.normcase(start)) or \
                (name.startswith(".") and not start.startswith(".")):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        sep = "/" if os.sep == "/" or "/" in folder else os.sep
        path = folder + name + (sep if is_dir else "")
        if quoted and (" " in path or typed.startswith('"')):
            found.append('"' + path + ("" if is_dir else '"'))
        elif " " in path:
            found.append(path.replace(" ", "\\ "))
        else:
            found.append(path)
    return found


def complete_line(before: str, nicks: list[str], rooms: list[str]) -> list[str]:
    """Tab completions for the text before the cursor, each the whole new text
    before the cursor: a slash command at the start, a room after /join, /part
    and /room, a path after /send (after an optional nick), a nick elsewhere
    ("bob: " at the start of a line, irssi style, "bob " after it)."""
    head, space, rest = before.partition(" ")
    if not space:
        if before.startswith("/") and not before.startswith("//"):
            return [c + " " for c in command_names("cli") if c.startswith(before.lower())]
        return [n + ": " for n in complete_nick(before, nicks)]
    cmd = head.lower()
    if cmd in ("/join", "/part", "/room") and " " not in rest:
        key = rest.lower()
        return [f"{head} {r} " for r in sorted(set(rooms), key=str.lower)
                if r.lower().startswith(key)]
    if cmd == "/send":
        first, sep, after = rest.partition(" ")
        if not sep:
            return ([f"{head} {n} " for n in complete_nick(first, nicks)]
                    + [f"{head} {p}" for p in complete_path(rest)])
        if nick_key(first) in {nick_key(n) for n in nicks}:
            found = [f"{head} {first} {p}" for p in complete_path(after)]
            if found:
                return found
        return [f"{head} {p}" for p in complete_path(rest)]
    word_at = before.rfind(" ") + 1
    return [before[:word_at] + n + " " for n in complete_nick(before[word_at:], nicks)]


def screen_places(text: str, columns: int) -> list[tuple[int, int]]:
    """(row, column) where each character of `text` starts when printed from
    column 0 with auto-wrap (a wide character that does not fit moves to the
    next row), and one more entry: where the cursor is left, a full last row
    counting as the start of the next one."""
    places = []
    row = col = 0
    for ch in text:
        w = _width(ch)
        if col + w > columns:
            row, col = row + 1, 0
        places.append((row, col))
        col += w
    places.append((row + 1, 0) if col >= columns else (row, col))
    return places


class Terminal:
    """Formats events and prints them above the prompt without garbling input."""

    def __init__(self, out: Any = None, color: bool | None = None, interactive: bool = False,
                 columns: int | None = None):
        self.out = out or sys.stdout
        isatty = hasattr(self.out, "isatty") and self.out.isatty()
        self.isatty = isatty
        self.width = columns             # None: ask the terminal (see columns())
        ansi = isatty and enable_windows_ansi()  # colours and redraws need escape codes
        self.color = ansi and not os.environ.get("NO_COLOR") if color is None else color
        self.interactive = interactive and ansi
        self.prompt = "> " if self.interactive else ""
        self.lock = threading.Lock()     # held by whoever writes to the screen
        self.editor: LineEditor | None = None  # set once the key thread runs
        self.plain_input = False         # no raw mode: input() reads the lines
        self.complete: Callable[[str], list[str]] = lambda before: []
        self.on_line: Callable[[str | None], None] | None = None
        self.early_lines: list[str | None] = []  # typed before on_line was given
        self.keys_done = False           # the key thread has ended
        self.question: tuple[str, bool] | None = None  # (prompt, secret) being asked
        self.asking = LineEditor()       # the answer being typed
        self.answer: queue.Queue[str | None] = queue.Queue()
        self.questions_lock = threading.Lock()
        self.cursor_row = 0              # prompt rows above the cursor
        self.closed = False              # close(): no prompt any more
        self.transient_shown = False   # the last line printed was a progress line
        self.me: Callable[[], str] = lambda: ""  # our nick now (the client knows it)
        self.room = LOBBY                # messages from other rooms get a [#room] prefix
        self.broken = False

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
        body = ("\n" + " " * CONTINUATION_INDENT).join(lines)
        me = self.me()
        mine = m.get("you") or nick_key(who) == nick_key(me)
        mention = bool(me) and not mine and nick_key(me) in nick_key(body)
        where = ""
        if m.get("type") == "pm":
            to = strip_terminal(str(m.get("to", "?")))
            where = self._c("35", f"[pm -> {to}] " if mine else "[pm] ")
        elif m.get("room") and nick_key(str(m["room"])) != nick_key(self.room):
            where = f"[{strip_terminal(str(m['room']))}] "
        if m.get("action"):
            text = f"{clock(m.get('ts'))} {where}* {self.nick(who)} {body}"
        else:
            text = f"{clock(m.get('ts'))} {where}<{self.nick(who)}> {body}"
        # Bold for the whole line: restarted after each colour's reset inside it.
        return self._c("1", text.replace("\x1b[0m", "\x1b[0;1m")) if mention else text

    def format_event(self, e: dict) -> str | None:
        """The line(s) to show for an event, or None for events with no display."""
        kind = str(e.get("type"))
        if kind.startswith("file_"):
            return self.format_file_event(e)
        formatter = getattr(self, f"_show_{kind}", None)
        return formatter(e, e.get("ts")) if formatter is not None else None

    def _show_msg(self, e: dict, ts: Any) -> str:
        return self.format_msg(e)

    _show_pm = _show_msg

    def _show_topic(self, e: dict, ts: Any) -> str:
        if not e.get("topic"):
            return self.system(None, f"{e.get('room')} has no topic")
        return self.system(ts, f"Topic of {e.get('room')}: {e.get('topic')} (set by {e.get('by')})")

    def _show_rooms(self, e: dict, ts: Any) -> str:
        rooms = [r for r in e.get("rooms", []) if isinstance(r, dict)]
        listed = "; ".join(f"{r.get('room')} ({r.get('users')})"
                           + (f": {r['topic']}" if r.get("topic") else "") for r in rooms)
        return self.system(ts, f"{len(rooms)} rooms: {listed}")

    def _show_notice(self, e: dict, ts: Any) -> str:
        return self.system(ts, str(e.get("text", "")))

    _show_whois = _show_stats = _show_notice

    def _show_away(self, e: dict, ts: Any) -> str:
        if e.get("away"):
            why = f": {e['message']}" if e.get("message") else ""
            return self.system(ts, f"{e.get('nick')} is away{why}")
        return self.system(ts, f"{e.get('nick')} is back")

    def _show_op(self, e: dict, ts: Any) -> str:
        return self.system(ts, "You are now an operator.")

    def _show_moderation(self, e: dict, ts: Any) -> str:
        action = {"kick": "kicked", "ban": "banned", "unban": "unbanned", "mute": "muted",
                  "unmute": "unmuted"}.get(str(e.get("action")), str(e.get("action")))
        why = f": {e['reason']}" if e.get("reason") else ""
        return self.system(ts, f"{e.get('nick')} was {action} by {e.get('by')}{why}")

    def _show_history(self, e: dict, ts: Any) -> str | None:
        msgs = [self.format_msg(m) for m in e.get("messages", []) if isinstance(m, dict)]
        if not msgs:
            return None
        said = "last message:" if len(msgs) == 1 else f"last {len(msgs)} messages:"
        return "\n".join([self.system(None, said), *msgs,
                          self.system(None, "end of history")])

    def _show_welcome(self, e: dict, ts: Any) -> str:
        if e.get("first") is False:  # back after a reconnect: where we were, still
            return self.system(ts, f"Back as {e.get('nick')}" + (
                "; nobody saw you leave." if e.get("resumed") else "."))
        text = f"You are {e.get('nick')} in {e.get('room')} on {e.get('server')} " \
               f"{e.get('version')}. Type /help for commands."
        lines = [self.system(ts, text)]
        if e.get("motd"):
            lines.append(self.system(ts, f"MOTD: {e['motd']}"))
        return "\n".join(lines)

    def _show_users(self, e: dict, ts: Any) -> str | None:
        if e.get("refresh"):  # the list after a netsplit line: the line said it
            return None
        away = e.get("away") if isinstance(e.get("away"), dict) else {}
        ops = e.get("ops") if isinstance(e.get("ops"), list) else []
        via = e.get("via") if isinstance(e.get("via"), dict) else {}
        users = [("@" if u in ops else "") + strip_terminal(str(u))
                 + (" (away)" if u in away else "")
                 + (f" (on {strip_terminal(str(via[u]))})" if u in via else "")
                 for u in e.get("users", [])]
        return self.system(ts, f"{len(users)} in {e.get('room')}: {', '.join(users)}")

    def _show_join(self, e: dict, ts: Any) -> str:
        via = f" (on {e['via']})" if e.get("via") else ""
        return self.system(ts, f"{e.get('nick')} joined {e.get('room')}{via}")

    def _show_leave(self, e: dict, ts: Any) -> str:
        if e.get("reason") == "kick":
            why = f" ({e['message']})" if e.get("message") else ""
            return self.system(ts, f"{e.get('nick')} was kicked out of {e.get('room')} by "
                                   f"{e.get('by')}{why}")
        if e.get("reason") == "part" and e.get("you"):
            return self.system(ts, f"You left {e.get('room')}")
        why = f"{e.get('reason')}: {e['message']}" if e.get("message") else e.get("reason")
        return self.system(ts, f"{e.get('nick')} left {e.get('room')} ({why})")

    def _show_mode(self, e: dict, ts: Any) -> str:
        change = "made {} an operator of {}" if e.get("op") else "took {}'s operator status in {}"
        return self.system(ts, f"{e.get('by')} " + change.format(e.get("nick"), e.get("room")))

    def _show_nick(self, e: dict, ts: Any) -> str:
        if e.get("you"):
            return self.system(ts, f"You are now known as {e.get('new')}")
        return self.system(ts, f"{e.get('old')} is now known as {e.get('new')}")

    def _show_error(self, e: dict, ts: Any) -> str:
        return self._c("31", f"! {strip_terminal(str(e.get('message', e.get('code'))))}")

    def _show_failed(self, e: dict, ts: Any) -> str:
        return self._c("31", f"! Not sent ({strip_terminal(str(e.get('message')))}): "
                             f"{strip_terminal(str(e.get('text')))[:80]}")

    def _show_status(self, e: dict, ts: Any) -> str | None:
        if e.get("state") == "closed":
            return None
        return self.system(None, str(e.get("message", "")))

    def _show_bye(self, e: dict, ts: Any) -> str:
        return self.system(None, f"Server says bye: {e.get('reason')}")

    def format_file_event(self, e: dict) -> str | None:
        kind, tid = e.get("type"), strip_terminal(str(e.get("id")))
        name = strip_terminal(str(e.get("name", "")))
        nick = strip_terminal(str(e.get("nick") or e.get("from") or ""))
        size = format_size(e.get("size") or 0)
        if kind == "file_offer":
            if e.get("mine"):
                to = strip_terminal(str(e.get("to") or e.get("room")))
                return self.system(e.get("ts"), f"You offer {name} ({size}) to {to} [{tid}]; "
                                                "waiting for answers")
            where = "you" if e.get("to") else strip_terminal(str(e.get("room")))
            return self.system(e.get("ts"), f"{nick} offers {name} ({size}) to {where}: "
                                            f"/accept {tid} or /decline {tid}")
        if kind == "file_accept":
            return self.system(None, f"{nick} accepted [{tid}]; sending")
        if kind == "file_decline":
            return self.system(None, f"{nick} declined [{tid}]")
        if kind == "file_cancel":
            return self.system(None, f"[{tid}] {nick} stopped the transfer: "
                                     f"{strip_terminal(str(e.get('reason', '')))}")
        if kind == "file_received":
            return self.system(None, f"Received {name} ({size}) from {nick}, size and SHA-256 "
                                     f"checked: {strip_terminal(str(e.get('path')))}")
        if kind == "file_sent":
            return self.system(None, f"{nick} received {name}, checked")
        if kind == "file_failed":
            who = f" ({nick})" if nick else ""
            return self._c("31", f"! {name}{who}: {strip_terminal(str(e.get('reason')))}")
        if kind == "file_progress":
            done, total = int(e.get("done") or 0), int(e.get("size") or 0)
            share = 100 * done / total if total else 100
            eta = e.get("eta")
            left = f", {eta:.0f} s left" if isinstance(eta, (int, float)) and done < total else ""
            arrow = "->" if e.get("direction") == "out" else "<-"
            return (f"[{tid}] {arrow} {nick} {share:5.1f}% {format_size(done)} of "
                    f"{format_size(total)} at {format_size(e.get('speed') or 0)}/s{left}")
        return None

    # --- output
    #
    # Only the holder of self.lock writes to the screen.  The prompt rows (the
    # prompt, or a question, and the typed text) are drawn only while a
    # LineEditor reads the keys; self.cursor_row remembers which of those rows
    # the cursor is on, so they can be cleared before anything else is printed.
    def columns(self) -> int | None:
        """The width to wrap at: the one given, the terminal's, or $COLUMNS when
        the output is piped; None when piped without $COLUMNS (a script reading
        the output gets one line per message, as sent)."""
        if self.width:
            return self.width
        if self.isatty or os.environ.get("COLUMNS"):
            return shutil.get_terminal_size().columns or 80
        return None

    def _screen_columns(self) -> int:
        """The terminal's real width, for placing the cursor in the prompt rows."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return shutil.get_terminal_size().columns or 80

    def show(self, text: str, transient: bool = False) -> None:
        """Print lines above the prompt and redraw the prompt and typed text.  A
        transient line (progress) is replaced by the next one on a terminal.
        Every line is wrapped here (wrap_rows), whatever event it came from."""
        with self.lock:
            if self.broken:
                return
            try:
                columns = self.columns()
                if self.interactive and transient:  # one row, so it can be replaced
                    text = text[:(columns or 80) - 1]
                elif columns:
                    text = "\n".join(row for line in text.split("\n")
                                     for row in wrap_rows(line, columns))
                self._write(text, transient)
            except (BrokenPipeError, OSError, ValueError):
                self.broken = True  # stdout went away (| head): stop printing, keep chatting

    def _write(self, text: str, transient: bool = False) -> None:
        if not self.interactive:
            self.out.write(text + "\n")
            self.out.flush()
            return
        replace, self.transient_shown = self.transient_shown, transient
        self._emit(self._clear_prompt(1 if replace else 0) + text + "\n" + self._draw_prompt())

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _prompt_line(self) -> tuple[str, str, int]:
        """The prompt (or question) to draw, the text typed after it and the
        cursor's index in that text; ("", "", 0) when nothing is drawn."""
        if self.closed:
            return "", "", 0
        if self.question is not None:
            prompt, secret = self.question
            if secret:
                return prompt, "", 0
            return prompt, self.asking.buffer(), self.asking.point
        if self.editor is not None:
            return self.prompt, self.editor.buffer(), self.editor.point
        if self.plain_input:  # input() draws its own line; this is its prompt again
            return self.prompt, "", 0
        return "", "", 0

    def _clear_prompt(self, extra_rows: int = 0) -> str:
        """Escapes that erase the prompt rows (and `extra_rows` above them)."""
        up, self.cursor_row = self.cursor_row + extra_rows, 0
        return "\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J"

    def _draw_prompt(self) -> str:
        """Escapes that draw the prompt and typed text from column 0 and put the
        cursor at the editing point; wide characters and wrapped rows included."""
        prompt, typed, point = self._prompt_line()
        text = prompt + typed
        if not text:
            return ""
        places = screen_places(text, self._screen_columns())
        (row, col), end = places[len(prompt) + point], places[-1]
        out = text
        if end[1] == 0 and end[0] > places[-2][0]:  # the last row is full: go below
            out += "\r\n"
        if (row, col) != end:
            up = end[0] - row
            out += (f"\x1b[{up}A" if up else "") + "\r" + (f"\x1b[{col}C" if col else "")
        self.cursor_row = row
        return out

    def redraw(self) -> None:
        """Draw the prompt rows again (after a key, or a question asked)."""
        with self.lock:
            if self.interactive and not self.broken:
                try:
                    self._emit(self._clear_prompt() + self._draw_prompt())
                except (OSError, ValueError):
                    self.broken = True

    def erase_typed_line(self, line: str) -> None:
        """Remove the line input() just echoed; the server's echo replaces it.
        (Only when no LineEditor runs: the editor never leaves a typed line.)"""
        if not self.interactive or self.editor is not None:
            return
        columns = self._screen_columns()
        rows = max(1, -(-_width(self.prompt + line) // columns))
        with self.lock:
            self.out.write(f"\r\x1b[{rows}A\x1b[J")
            self.out.flush()

    def close(self) -> None:
        """Take the prompt rows away for good, so that what is printed next (the
        final error on stderr, the shell's prompt) starts on a clean row."""
        with self.lock:
            if not self.interactive or self.closed:
                return
            self.closed = True
            try:
                self._emit(self._clear_prompt() + ("\x1b[?2004l" if self.editor else ""))
            except (OSError, ValueError):
                self.broken = True

    # --- input: one thread reads the keys and edits under the lock
    def ask(self, prompt: str, secret: bool = False) -> str | None:
        """Ask a question in the prompt row and wait for the answer (None: Ctrl-D
        or Ctrl-C); a secret answer is not shown.  Blocks: call it from a
        thread other than the one reading keys."""
        if not self.start_editor():
            try:
                return (getpass.getpass if secret else input)(prompt)
            except (EOFError, KeyboardInterrupt, OSError):
                return None
        answer: queue.Queue[str | None] = queue.Queue(maxsize=1)
        with self.questions_lock:  # one question at a time
            with self.lock:
                if self.keys_done:
                    return None
                self.question, self.answer = (prompt, secret), answer
                self.asking = LineEditor()
            self.redraw()
            return answer.get()

    def start_editor(self, on_line: Callable[[str | None], None] | None = None,
                     complete: Callable[[str], list[str]] | None = None) -> bool:
        """Read the keys with our own LineEditor in a daemon thread (once);
        lines typed go to `on_line` once it is given.  False when the terminal
        cannot be put in raw mode (then plain input() is the way)."""
        with self.lock:
            if on_line is not None:
                self.on_line = on_line
            if complete is not None:
                self.complete = complete
            early, self.early_lines = self.early_lines, []
            started = self.editor is not None
        if on_line is not None:
            for line in early:
                on_line(line)
        if started:
            return True
        if not self.interactive or self.plain_input:
            return False
        keys = _console_keys()
        if keys is None:
            self.plain_input = True
            return False
        with self.lock:
            self.editor = LineEditor(lambda before: self.complete(before))
            if sys.platform != "win32":
                self._emit("\x1b[?2004h")  # bracketed paste: pasted text never acts as keys
        threading.Thread(target=self._read_keys, args=(keys,), name="pychat-keys",
                         daemon=True).start()
        self.redraw()
        return True

    def _read_keys(self, batches: Iterator[list[str]]) -> None:
        """The key thread: each batch of keys is edited, then drawn, under the
        lock; typed lines are handed on after it is released."""
        for batch in batches:
            lines: list[str | None] = []
            with self.lock:
                for key in batch:
                    self._key(key, lines)
                if not self.broken and not self.closed:
                    try:
                        self._emit(self._clear_prompt() + self._draw_prompt())
                    except (OSError, ValueError):
                        self.broken = True
                deliver = self.on_line
                if deliver is None:
                    self.early_lines += lines
                    lines = []
            for line in lines:
                deliver(line)  # type: ignore[misc]
            if None in lines:
                return
        with self.lock:  # the terminal went away: end of input
            self.keys_done = True
            if self.question is not None:
                self.answer.put(None)
                self.question = None
            deliver = self.on_line
            if deliver is None:
                self.early_lines.append(None)
        if deliver is not None:
            deliver(None)

    def _key(self, key: str, lines: list[str | None]) -> None:
        """One key, with the lock held."""
        editor = self.asking if self.question is not None else self.editor
        assert editor is not None
        try:
            action, line = editor.feed(key)
        except KeyboardInterrupt:
            action, line = "eof", ""
        if self.question is not None and action in ("submit", "eof"):
            self.answer.put(line if action == "submit" else None)
            self.question = None
        elif action == "submit":
            lines.append(line)
        elif action == "eof" and None not in lines:
            lines.append(None)
        elif action == "list" and not self.broken:
            names = "  ".join(completion_names(editor.matches))
            columns = self.columns() or 80
            rows = "\n".join(wrap_rows(strip_terminal(names), columns))
            self._emit(self._clear_prompt() + rows + "\n" + self._draw_prompt())


def _console_keys() -> Iterator[list[str]] | None:
    """Batches of keys from the console (POSIX raw mode, or Windows' msvcrt);
    None when the terminal cannot be put in raw mode."""
    if sys.platform == "win32":
        return _windows_keys()
    try:
        import termios  # POSIX only
        fd = sys.stdin.fileno()
        attrs = termios.tcgetattr(fd)
        # No line editing or echo by the tty; Enter arrives as \r.  ISIG stays
        # on: Ctrl-C is still SIGINT (the loop's handler), Ctrl-Z still suspends.
        attrs[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR)
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except (ImportError, OSError, ValueError, AttributeError) as e:
        log.debug("no raw mode: %s", e)
        return None
    except Exception as e:  # termios.error is not an OSError
        log.debug("no raw mode: %s", e)
        return None
    return _posix_keys(fd)


def _posix_keys(fd: int) -> Iterator[list[str]]:
    """Keys from a tty in raw mode, a batch per read (a paste comes in few)."""
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    decoder = KeyDecoder()
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:  # the terminal went away
            return
        keys = decoder.feed(decode(data))
        while decoder.pending:  # an escape sequence cut in two, or a lone ESC
            if select.select([fd], [], [], ESC_WAIT)[0]:
                keys += decoder.feed(decode(os.read(fd, 65536)))
            else:
                keys += decoder.flush()
        yield keys


def _windows_keys() -> Iterator[list[str]]:
    """Keys from a Windows console through msvcrt, a batch per burst."""
    import msvcrt  # Windows only; imported here so other systems never need it
    special = {"H": KEY_UP, "P": KEY_DOWN, "K": KEY_LEFT, "M": KEY_RIGHT, "G": KEY_HOME,
               "O": KEY_END, "S": KEY_DELETE}
    while True:
        batch: list[str] = []
        while True:
            ch = msvcrt.getwch()  # type: ignore[attr-defined]
            if ch in ("\x00", "\xe0"):  # arrows and function keys: a second code follows
                key = special.get(msvcrt.getwch())  # type: ignore[attr-defined]
                if key:
                    batch.append(key)
            else:
                batch.append("\x04" if ch == "\x1a" else ch)  # Ctrl-Z is Windows' end of input
            if not msvcrt.kbhit():  # type: ignore[attr-defined]
                break
        yield batch


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
        return await CliSession(args).run()
    finally:
        restore()


class CliSession:
    """One run of the terminal client: the connection (a ChatClient), the
    terminal, and the lines typed or piped in.  Events from the client are
    shown by on_event (special kinds by the _on_<kind> methods); a typed line
    becomes a Plan (plan_command) that a do_<plan> method carries out."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.interactive = sys.stdin.isatty()
        self.term = Terminal(interactive=self.interactive)
        self.term.me = lambda: self.client.nick
        self.loop = asyncio.get_running_loop()
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.done = asyncio.Event()
        self.code = 0                  # the exit status, once something decided it
        self.failed = 0                # messages or files that did not go through
        self.input_started = False
        self.ready = False             # welcomed, and the first room's users shown
        self.progress_at = 0.0
        self.settings_path = config_dir() / "settings.json"
        self.settings = load_settings(self.settings_path)
        self.client: ChatClient = None  # type: ignore[assignment]  # made in run()

    async def run(self) -> int:
        args = self.args
        try:
            password = read_secret(args.password_file) if args.password_file else None
        except (OSError, ValueError) as e:
            raise PyChatError(f"cannot read {args.password_file}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        password = password or os.environ.get("PYCHAT_PASSWORD") or None
        ignored = {str(n) for n in self.settings.get("ignore", []) if isinstance(n, str)}
        self.client = ChatClient(
            args.host, args.port, args.nick or default_nick(), self.on_event,
            client=f"pychat-cli/{__version__}", history=not args.no_history,
            connect_attempts=args.connect_attempts, password=password,
            ssl_context=getattr(args, "found_tls", None) or tls_from_args(args),
            # (tls_from_args: PyChatError, which main() says in one line)
            ignored=ignored, give_up_after=None if self.interactive else 60.0)
        if not self.interactive:
            self._start_input()
        runner = self.loop.create_task(self.client.run())
        reader = self.loop.create_task(self.read_input())
        waiter = self.loop.create_task(self.done.wait())
        try:  # Ctrl-C leaves cleanly; where signal handlers don't exist (Windows)
            self.loop.add_signal_handler(signal.SIGINT,
                                         lambda: self.loop.create_task(self.client.quit("")))
        except (NotImplementedError, RuntimeError, AttributeError):
            pass  # ...it arrives as KeyboardInterrupt and cmd_cli handles it
        try:
            await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            waiter.cancel()
            if not runner.done():
                await self.client.quit("")
                await asyncio.wait({runner}, timeout=3)
            try:
                self.loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, AttributeError):
                pass
            self.term.close()  # no prompt left: the shell's, or an error, starts a clean row
        return self._exit_status()

    def _exit_status(self) -> int:
        client = self.client
        if client.outbox:
            print(f"pychat: {len(client.outbox)} message(s) could not be delivered.",
                  file=sys.stderr)
            return self.code or 1
        if self.code == 0 and self.failed and not self.interactive:
            return 1
        if self.code == 0 and not client.ever_registered:
            print("pychat: left before joining the chat." if client.closed and self.interactive
                  else "pychat: never got connected.", file=sys.stderr)
            return 1
        return self.code

    def _start_input(self) -> None:
        self.input_started = True
        _start_input_thread(self.term, self.loop, self.lines, self.names)

    def names(self) -> tuple[list[str], list[str]]:
        """Nicks and rooms to complete (called from the input thread)."""
        return self.client.state.members(self.client.room), self.client.state.known_rooms()

    # --- events from the client
    def on_event(self, event: dict) -> None:
        kind = str(event.get("type"))
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None and handler(event):
            return  # handled, nothing more to show
        self.term.room = self.client.room
        text = self.term.format_event(event)
        if text is not None:
            self.term.show(text, transient=kind == "file_progress")

    def _on_nick_rejected(self, event: dict) -> bool:
        return self._ask_again(event, "Type another nick: ", False, self._take_nick,
                               "choose another with --nick")

    def _on_password_needed(self, event: dict) -> bool:
        return self._ask_again(event, "Password: ", True, self._take_password,
                               "give it with --password-file or PYCHAT_PASSWORD")

    def _ask_again(self, event: dict, prompt: str, secret: bool,
                   take: Callable[[str], str | None], hint: str) -> bool:
        """The server refused what we said (nick or password): ask the person
        at the terminal, or, for a script, give up with a hint."""
        message = str(event.get("message"))
        if not self.interactive:
            print(f"pychat: {message} ({hint})", file=sys.stderr)
            self.code = 2
            self.loop.create_task(self.client.quit())
            return True

        async def ask() -> None:
            self.error_line(strip_terminal(message))
            while True:
                answer = await self.ask(prompt, secret)
                if answer is None:
                    await self.client.quit()
                    return
                problem = take(answer)
                if problem is None:
                    return
                self.error_line(problem)
        self.loop.create_task(ask())
        return True

    def _take_nick(self, answer: str) -> str | None:
        problem = nick_problem(answer.strip())
        if problem is None:
            self.client.set_nick(answer.strip())
        return problem

    def _take_password(self, answer: str) -> str | None:
        self.client.set_password(answer)
        return None

    def ask(self, prompt: str, secret: bool = False) -> asyncio.Future:
        """Ask on the terminal in a daemon thread (never blocks exiting)."""
        future = self.loop.create_future()

        def run() -> None:
            try:
                answer = self.term.ask(prompt, secret)
            except (EOFError, KeyboardInterrupt, OSError):
                answer = None
            self.loop.call_soon_threadsafe(lambda: future.done() or future.set_result(answer))
        threading.Thread(target=run, name="pychat-ask", daemon=True).start()
        return future

    def _on_fatal(self, event: dict) -> bool:
        self.term.close()  # the error starts a clean row, after no prompt
        print(f"pychat: {event.get('message')}", file=sys.stderr)
        self.code = 1
        self.done.set()
        return True

    def _on_failed(self, event: dict) -> bool:
        self.failed += 1
        return False

    def _on_file_failed(self, event: dict) -> bool:
        self.failed += 1
        return False

    def _on_welcome(self, event: dict) -> bool:
        if not self.input_started:
            self._start_input()
        return False

    def _on_status(self, event: dict) -> bool:
        # Scripts want the chat, not the connection chatter.
        return not self.interactive and event.get("state") in ("connecting", "connected")

    def _on_file_progress(self, event: dict) -> bool:
        if self.interactive:
            return False
        if time.monotonic() - self.progress_at < 2 and event["done"] < event["size"]:
            return True  # a line every 2 s is plenty in a log
        self.progress_at = time.monotonic()
        return False

    def _on_file_offer(self, event: dict) -> bool:
        limit = self.args.auto_accept_max
        if not event.get("mine") and limit is not None and int(event.get("size") or 0) <= limit:
            self.loop.call_soon(self.do_accept, str(event.get("id")))  # after the offer line
        return False

    # --- typed lines
    async def read_input(self) -> None:
        while True:
            line = await self.lines.get()
            if not self.interactive:
                # A script's lines follow the server's welcome, and its end of
                # input waits until every line was sent and confirmed.
                await self.wait_registered()
                if line is None:
                    await self.client.wait_sent()
                    await self.wait_transfers()
            if line is None:  # end of input
                await self.client.quit("end of input" if not self.interactive else "")
                return
            if not await self.handle_input(line):
                return

    async def handle_input(self, line: str) -> bool:
        """Act on one typed line; False when the user quits."""
        plan = plan_command(line.rstrip("\r\n"), self.client.where("cli"))
        if plan.note:
            self.show(plan.note)
        done = getattr(self, f"do_{plan.do}")(**plan.args)
        if asyncio.iscoroutine(done):
            done = await done
        return done is not False

    async def wait_registered(self) -> None:
        """Until the welcome and what follows it (the history, then the room's
        user list) were shown: a script's first line acts after them."""
        while not self.ready and not self.client.closed:
            self.ready = self.client.ever_registered and bool(
                self.client.state.members(self.client.room))
            await asyncio.sleep(0 if self.ready else 0.02)

    async def wait_transfers(self) -> None:
        """A script's end waits for its files: every receiver has finished or
        answered, or nothing has happened for a minute."""
        client = self.client
        idle_since, seen = time.monotonic(), None
        while client.transfers_busy() and not client.closed:
            now_state = (self.failed, tuple((t["state"], tuple(t["peers"].values()))
                                            for t in client.state.transfer_list()))
            if now_state != seen:
                seen, idle_since = now_state, time.monotonic()
            busy = any(t["state"] in ("sending", "receiving")
                       for t in client.state.transfer_list())
            if not busy and time.monotonic() - idle_since > 60:
                waiting = sorted({n for t in client.state.transfer_list()
                                  for n, p in t["peers"].items() if p == "waiting"})
                self.error_line(f"No answer from {', '.join(waiting)}; giving up on the files.")
                self.failed += 1
                return
            await asyncio.sleep(0.05)

    def show(self, text: str) -> None:
        self.term.show(self.term.system(None, text))

    def error_line(self, text: str) -> None:
        self.term.show(self.term._c("31", f"! {text}"))

    def do_nothing(self) -> None:
        pass

    def do_error(self, text: str, lost: bool = False) -> None:
        self.failed += lost
        self.error_line(strip_terminal(text))

    def do_show(self, text: str) -> None:
        self.show(text)

    def do_say(self, text: str, action: bool, to: str | None, room: str,
               open: bool = False) -> None:
        client = self.client
        if to is None:
            client.send_msg(text, action, room)
        else:
            client.send_pm(to, text, action)
        if self.interactive and not client.registered:
            self.show(f"not connected: queued ({len(client.pending())} waiting), sent when "
                      f"the connection is back: {text[:60]}")

    async def do_quit(self, reason: str) -> bool:
        if not self.interactive:
            await self.client.wait_sent()
        await self.client.quit(reason)
        return False

    def do_help(self, rows: list[tuple[str, str]]) -> None:
        self.term.show(help_text("cli"))

    def do_nick(self, nick: str) -> None:
        self.client.change_nick(nick)

    def do_who(self, room: str) -> None:
        self.client.request_users()

    def do_join(self, room: str) -> None:
        if not self.client.switch_room(room):
            # Requests go out in order, so what is typed next already
            # belongs to the new room.
            self.client.request("join", room=room)
            self.client.room = room
        self.do_switch(self.client.room)

    def do_switch(self, room: str) -> None:
        self.client.switch_room(room)
        self.term.room = self.client.room
        self.show(f"Now talking in {self.client.room}.")

    def do_request(self, kind: str, fields: dict) -> None:
        self.client.request(kind, **fields)

    def do_send_file(self, path: str, to: str | None) -> None:
        try:
            self.client.send_file(path, to)
        except OSError as e:
            self.failed += 1
            self.error_line(f"Cannot send {strip_terminal(path)}: {e.strerror or e}")

    def do_accept(self, tid: str) -> None:
        shown = self.client.state.transfer(tid)
        if shown is None or shown["direction"] != "in" or shown["state"] != "offered":
            self.error_line(f"No file offer {strip_terminal(tid)} is waiting for you. /files "
                            "lists them.")
            return
        folder = self.args.download_dir
        try:
            part = self.client.accept_file(tid, folder)
        except OSError as e:
            self.failed += 1
            self.error_line(f"Cannot save into {folder or download_dir()}: {e.strerror or e}")
            return
        if part is not None:  # None: refused, and a file_failed event said why
            self.show(f"Accepted [{tid}]; saving to {part.parent}")

    def do_decline(self, tid: str) -> None:
        if not self.client.decline_file(tid):
            self.error_line(f"No file offer {strip_terminal(tid)} is waiting. /files lists them.")
        else:
            self.show(f"Declined [{tid}].")

    def do_cancel(self, tid: str) -> None:
        shown = self.client.state.transfer(tid)
        if self.client.cancel_file(tid):
            return
        if shown is not None and shown["state"] in FINAL:
            self.show(f"{shown['name']} has finished ({transfer_summary(shown)}); "
                      "nothing to stop.")
        else:
            self.error_line(f"No transfer {strip_terminal(tid)} under way. /files lists them.")

    def do_files(self) -> None:
        rows = []
        for t in self.client.state.transfer_list():
            arrow = f"from {t['nick']}" if t["direction"] == "in" else f"to {t['nick']}"
            rows.append(f"[{t['id']}] {t['name']} ({format_size(t['size'])}) {arrow}: "
                        f"{transfer_summary(t)}")
        self.show("Files: " + (strip_terminal("; ".join(rows)) or "none"))

    def do_ignores(self) -> None:
        self.show(f"Ignoring: {', '.join(sorted(self.client.ignored)) or 'nobody'}")

    def do_ignore(self, nick: str, on: bool) -> None:
        self.client.ignore(nick, on)
        self.settings["ignore"] = sorted(self.client.ignored)
        save_settings(self.settings_path, self.settings)
        verb = "Ignoring" if on else "No longer ignoring"
        self.show(f"{verb} {nick} (saved in {self.settings_path}).")


def _start_input_thread(term: Terminal, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue,
                        names: Callable[[], tuple[list[str], list[str]]]) -> None:
    """Hand each typed line (None: end of input) to the loop: from our own line
    editor on a terminal, else read from stdin in a daemon thread.  `names`
    gives (nicks, rooms) for Tab completion; it is called from that thread."""

    def deliver(line: str | None) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # loop closed: we are exiting
            pass

    if term.interactive and term.start_editor(deliver,
                                              lambda before: complete_line(before, *names())):
        return

    def read_line() -> str | None:
        if term.interactive:  # a terminal with no raw mode: input() echoes
            try:
                return input(term.prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line if line else None

    def pump() -> None:
        while True:
            try:
                line = read_line()
            except (KeyboardInterrupt, OSError, ValueError):
                line = None
            if line is not None and line.strip():
                # Here, not on the loop: a message printed in between would be
                # the line erased instead (the server's echo replaces ours).
                term.erase_typed_line(line.rstrip("\r\n"))
            deliver(line)
            if line is None:
                return

    threading.Thread(target=pump, name="pychat-stdin", daemon=True).start()


# ===========================================================================
# 7. GUI client -- ConnectDialog, ChatWindow, run_gui().  Uses: constants,
#    protocol, client core, sound, and the CLI's pure helpers (commands,
#    nick completion).  tkinter is imported only inside this section's
#    functions, so the server and the CLI run where Tk is missing.
#
# Threads: only the Tk (main) thread touches widgets.  The network runs in a
# ClientThread; its events arrive in a queue.Queue that the window drains
# every POLL_MS with after(), and the window calls the ClientThread's
# methods, which hop onto the network loop with call_soon_threadsafe.
# ===========================================================================

POLL_MS = 50                   # how often the window drains network events
EVENTS_PER_POLL = 500          # bounded work per tick keeps the window responsive
MAX_CHAT_LINES = 5000          # the chat pane forgets its oldest lines past this
TYPING_SHOWN_FOR = 6.0         # seconds a "typing" notice stays without news

THEME = {
    "bg": "#313338", "side": "#2b2d31", "header": "#1e1f22", "input": "#383a40",
    "text": "#dbdee1", "dim": "#949ba4", "accent": "#5865f2", "accent_hover": "#4752c4",
    "button": "#4e5058", "button_hover": "#6d6f78", "mention": "#4a4537",
    "mention_bar": "#f0b232", "link": "#00a8fc", "error": "#f23f43", "ok": "#23a55a",
    "marker": "#f23f43", "pending": "#80848e", "thumb": "#5c5f66",
}

URL_RE = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]}]")

# The emoji picker's groups.  Non-BMP ones are offered only where Tk can show
# them (see emoji_groups); the BMP symbols render with ordinary fonts.
EMOJI = {
    "Smileys": "😀 😃 😄 😁 😆 😅 😂 🙂 😉 😊 😍 😘 😎 🤔 😐 😴 😢 😭 😡 😱",
    "Gestures": "👍 👎 👏 🙌 🙏 👋 💪 👌 🤝 ✌",
    "Things": "🎉 🎂 🍕 🍺 💻 📎 📌 🚀 ⏰ 🔥 ✨ 💯",
    "Symbols": "☺ ☹ ❤ ♥ ★ ☆ ✔ ✖ ☀ ☁ ☂ ☕ ♫ ⚡ ⚠ ♻ ✉ ✂ ⌛ ☎",
}
EMOJI_COLUMNS = 8              # the picker's grid is this many emoji wide
EMOJI_RECENT = 16              # the picker's "Recent" tab keeps this many
INPUT_MIN_LINES = 1            # the message box grows with its text between these
INPUT_MAX_LINES = 8            # ...and scrolls past the maximum
GROUP_SECONDS = 300            # a sender's follow-up within this long joins their run
THUMBNAIL = 200                # pixels: received pictures are shown this big at most
COLOR_EMOJI_FONTS = ("Noto Color Emoji", "Apple Color Emoji", "Segoe UI Emoji",
                     "Twemoji", "JoyPixels", "EmojiOne Color", "Symbola")


def nick_hex(nick: str) -> str:
    """A stable colour for a nick: one of 24 (12 hues 30 degrees apart, in two
    lightnesses), all readable on the dark background."""
    import colorsys
    i = int.from_bytes(hashlib.sha256(nick_key(nick).encode("utf-8")).digest()[:4], "big") % 24
    r, g, b = colorsys.hls_to_rgb((i % 12) / 12 + 0.02, 0.68 if i < 12 else 0.78, 0.75)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def find_urls(text: str) -> list[tuple[int, int, str]]:
    """(start, end, url) of every link in text; www. links get http://."""
    found = []
    for m in URL_RE.finditer(text):
        url = m.group(0)
        found.append((m.start(), m.end(), url if "://" in url else "http://" + url))
    return found


def mentions(text: str, nick: str) -> bool:
    """True if `nick` appears in `text` as a word (case-insensitive)."""
    if not nick:
        return False
    pattern = r"(?<![\w])" + re.escape(nick_key(nick)) + r"(?![\w])"
    return re.search(pattern, nick_key(text)) is not None


def tk_safe(text: str, non_bmp: bool = True) -> str:
    """Text that Tk can take: no lone surrogates, no NUL, and no characters
    above U+FFFF on a Tk too old to show them (they become U+FFFD)."""
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    if not non_bmp:
        text = "".join(ch if ord(ch) <= 0xFFFF else "\ufffd" for ch in text)
    return text


def bmp_only(text: str) -> bool:
    """Validator for one-line entries: Tk's Entry corrupts memory when non-BMP
    characters are edited in it (Tk 8.6), so they are refused there."""
    return all(ord(ch) <= 0xFFFF for ch in text)


def tk_handles_non_bmp(patchlevel: str) -> bool:
    """Tk 8.6.10 and newer pass characters above U+FFFF through intact."""
    try:
        parts = tuple(int(p) for p in re.findall(r"\d+", patchlevel)[:3])
    except ValueError:
        return False
    return parts >= (8, 6, 10)


def emoji_groups(non_bmp: bool, families: set[str]) -> dict[str, list[str]]:
    """The emoji the picker offers on this Tk: all of them with a colour-emoji
    (or broad symbol) font and a Tk that handles non-BMP text, else only the
    BMP symbols that ordinary fonts draw."""
    full = non_bmp and any(f in families for f in COLOR_EMOJI_FONTS)
    groups: dict[str, list[str]] = {}
    for name, chars in EMOJI.items():
        keep = [c for c in chars.split() if full or ord(c) <= 0xFFFF]
        if keep:
            groups[name] = keep
    return groups


EMOJI_GLUE = "\u200d\ufe0f\u20e3"  # zero-width joiner, emoji presentation, keycap


def is_emoji(ch: str) -> bool:
    """True for the characters a colour emoji font draws better than a text
    font: pictographs above U+FFFF and the BMP's symbols and dingbats."""
    o = ord(ch)
    return o >= 0x1F000 or 0x2600 <= o <= 0x27BF or 0x2300 <= o <= 0x23FF \
        or 0x2B00 <= o <= 0x2BFF


def emoji_runs(text: str) -> list[tuple[int, int]]:
    """(start, end) code-point offsets of the runs of emoji in text (a run
    keeps the joiners and selectors inside and right after it)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, ch in enumerate(text):
        if is_emoji(ch) or (start is not None and ch in EMOJI_GLUE):
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(text)))
    return runs


def emoji_name(ch: str) -> str:
    """An emoji's Unicode name in lower case ("thumbs up sign"), "" if none."""
    return unicodedata.name(ch[0], "").lower() if ch else ""


def emoji_search(query: str, groups: dict[str, list[str]]) -> list[str]:
    """The emoji whose Unicode names hold every word of the query."""
    words = query.lower().split()
    found: list[str] = []
    for chars in groups.values():
        for ch in chars:
            name = emoji_name(ch)
            if words and all(w in name for w in words) and ch not in found:
                found.append(ch)
    return found


class HoverButton:
    """A flat tk.Button that lights up under the mouse and shows keyboard focus."""

    def __init__(self, master: Any, text: str, command: Callable[[], None], *,
                 bg: str, hover: str, font: Any = None, width: int | None = None):
        import tkinter as tk
        self.bg, self.hover = bg, hover
        self.widget = tk.Button(master, text=text, command=command, bg=bg, fg="#ffffff",
                                activebackground=hover, activeforeground="#ffffff",
                                relief="flat", bd=0, padx=12, pady=6, cursor="hand2",
                                highlightthickness=2, highlightbackground=THEME["bg"],
                                highlightcolor=THEME["text"], takefocus=True)
        if font is not None:
            self.widget.configure(font=font)
        if width is not None:
            self.widget.configure(width=width)
        self.widget.bind("<Enter>", lambda e: self.widget.configure(bg=self.hover))
        self.widget.bind("<Leave>", lambda e: self.widget.configure(bg=self.bg))
        self.widget.bind("<Return>", lambda e: command())
        self.widget.bind("<space>", lambda e: command())


class ConnectDialog:
    """Host, port and nick, with errors shown in place; calls on_connect."""

    def __init__(self, master: Any, host: str, port: int, nick: str,
                 on_connect: Callable[[str, int, str], None],
                 scan: Callable[[], None] | None = None):
        import tkinter as tk
        self.master = master
        self.on_connect = on_connect
        self.scan = scan               # starts a LAN search; show_found gets its result
        self.found: list[Any] = []     # FoundServer rows of the list
        self.busy = False
        self.frame = tk.Frame(master, bg=THEME["bg"], padx=30, pady=24)
        self.frame.pack(fill="both", expand=True)
        tk.Label(self.frame, text="PyChat", font=("TkDefaultFont", 20, "bold"),
                 bg=THEME["bg"], fg=THEME["text"]).grid(row=0, column=0, columnspan=2,
                                                         sticky="w", pady=(0, 4))
        tk.Label(self.frame, text="Join a chat server", bg=THEME["bg"],
                 fg=THEME["dim"]).grid(row=1, column=0, columnspan=2, sticky="w", pady=(0, 14))
        check = (master.register(bmp_only), "%P")
        self.vars = {}
        top = 6 if scan is not None else 2  # the servers found come first (rows 2-5)
        for row, (label, value) in enumerate((("Server", host), ("Port", str(port)),
                                              ("Nick", nick), ("Password", "")), start=top):
            tk.Label(self.frame, text=label, bg=THEME["bg"], fg=THEME["dim"]).grid(
                row=row, column=0, sticky="w", pady=4, padx=(0, 10))
            # A value the validator would refuse switches validation off for
            # good, so characters above U+FFFF are dropped from prefills.
            var = tk.StringVar(value="".join(ch for ch in value if ord(ch) <= 0xFFFF))
            entry = tk.Entry(self.frame, textvariable=var, width=28, bg=THEME["input"],
                             fg=THEME["text"], insertbackground=THEME["text"], relief="flat",
                             highlightthickness=2, highlightbackground=THEME["input"],
                             highlightcolor=THEME["accent"], validate="key",
                             validatecommand=check, show="•" if label == "Password" else "")
            entry.grid(row=row, column=1, sticky="ew", pady=4, ipady=4)
            entry.bind("<Return>", lambda e: self.submit())
            self.vars[label.lower()] = (var, entry)
        self.error = tk.Label(self.frame, text="", bg=THEME["bg"], fg=THEME["error"],
                              wraplength=320, justify="left")
        tk.Label(self.frame, text="(only if the server asks for one)", bg=THEME["bg"],
                 fg=THEME["dim"], font=("TkDefaultFont", 8)).grid(row=top + 4, column=1,
                                                                  sticky="w")
        self.error.grid(row=top + 5, column=0, columnspan=2, sticky="w", pady=(10, 0))
        self.button = HoverButton(self.frame, "Connect", self.submit, bg=THEME["accent"],
                                  hover=THEME["accent_hover"])
        self.button.widget.grid(row=top + 6, column=0, columnspan=2, sticky="ew", pady=(12, 0))
        self.frame.columnconfigure(1, weight=1)
        if scan is not None:
            self._build_found(tk)
            self.rescan()
        first_empty = next((e for k, (v, e) in self.vars.items()
                            if not v.get() and k != "password"), self.vars["nick"][1])
        first_empty.focus_set()

    def _build_found(self, tk: Any) -> None:
        """The servers LAN discovery found: a list to pick from, a Rescan
        button, and a line that says what happened (why, when none)."""
        tk.Label(self.frame, text="On this network", bg=THEME["bg"], fg=THEME["dim"]).grid(
            row=2, column=0, columnspan=2, sticky="w", pady=(0, 4))
        self.found_list = tk.Listbox(self.frame, height=4, bg=THEME["input"], fg=THEME["text"],
                                     selectbackground=THEME["accent"], relief="flat",
                                     highlightthickness=0, activestyle="none", exportselection=False)
        self.found_list.grid(row=3, column=0, columnspan=2, sticky="ew")
        self.found_list.bind("<<ListboxSelect>>", lambda e: self._pick())
        self.found_list.bind("<Double-Button-1>", lambda e: self.submit())
        self.found_status = tk.Label(self.frame, text="", bg=THEME["bg"], fg=THEME["dim"],
                                     wraplength=360, justify="left")
        self.found_status.grid(row=4, column=0, columnspan=2, sticky="w", pady=(4, 0))
        self.rescan_button = HoverButton(self.frame, "Rescan", self.rescan, bg=THEME["input"],
                                         hover=THEME["accent_hover"])
        self.rescan_button.widget.grid(row=5, column=0, columnspan=2, sticky="ew", pady=(6, 18))

    def rescan(self) -> None:
        if self.scan is None:
            return
        self.found_status.configure(text="Looking for servers on this network...")
        self.rescan_button.widget.configure(state="disabled")
        self.scan()

    def show_found(self, result: Any) -> None:
        """A LAN search's result: one server is filled in, several are listed
        to pick from, none says what was tried and the likely causes."""
        self.found = list(result.servers)
        self.found_list.delete(0, "end")
        for s in self.found:
            tags = ", ".join(t for t, on in (("TLS", s.tls), ("password", s.password)) if on)
            users = f"{s.users} user{'s' if s.users != 1 else ''}"
            self.found_list.insert("end", tk_safe(f" {s.name}   {s.address}   {users}"
                                                  + (f"   ({tags})" if tags else "")))
        self.rescan_button.widget.configure(state="normal")
        if not self.found:
            self.found_status.configure(text=tk_safe(
                result.explain() + "\nYou can still type the server's address below."))
            return
        self.found_status.configure(text=f"Found {len(self.found)} server"
                                         f"{'s' if len(self.found) != 1 else ''}: pick one"
                                         f"{'' if len(self.found) == 1 else ' from the list'}.")
        if len(self.found) == 1:
            self.found_list.selection_set(0)
            self._pick()

    def _selected(self) -> Any:
        picked = self.found_list.curselection() if self.scan is not None else ()
        return self.found[picked[0]] if picked else None

    def _pick(self) -> None:
        s = self._selected()
        if s is not None:
            self.vars["server"][0].set(s.host)
            self.vars["port"][0].set(str(s.port))

    def chosen(self) -> Any:
        """The found server that is selected and still in the fields, or None."""
        s = self._selected()
        return s if s and (self.value("server"), self.value("port")) == (s.host, str(s.port)) \
            else None

    def value(self, name: str) -> str:
        return self.vars[name][0].get().strip()

    def focus(self, name: str) -> None:
        self.vars[name][1].focus_set()

    def submit(self) -> None:
        if self.busy:  # a second Return while connecting must not open a second link
            return
        host, port_text, nick = self.value("server"), self.value("port"), self.value("nick")
        if not host:
            return self.show_error("Enter the server's address (for example localhost).")
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else 0
        if not 0 < port < 65536:
            return self.show_error("The port is a number from 1 to 65535.")
        problem = nick_problem(nick)
        if problem:
            return self.show_error(problem)
        self.set_busy(True)
        self.show_error("")
        self.on_connect(host, port, nick)

    def show_error(self, text: str) -> None:
        self.error.configure(text=tk_safe(text))

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.button.widget.configure(state="disabled" if busy else "normal",
                                     text="Connecting..." if busy else "Connect")

    def destroy(self) -> None:
        self.frame.destroy()


class Conversation:
    """One room or one private conversation: its own chat pane and state."""

    def __init__(self, key: str, name: str, frame: Any, text: Any):
        self.key, self.name = key, name
        self.is_room = name.startswith("#")
        self.frame, self.text = frame, text
        self.run: tuple[str, float] | None = None  # (nick key, ts) of the last message's sender
        self.topic = ""
        self.unread = 0                      # messages not yet looked at
        self.marker_pending = False          # the unread marker goes before the next one
        self.pinned = True                   # follow new lines unless scrolled up
        self.colours: set[str] = set()       # nick colour tags made in this pane
        self.said_gone = False               # private: "bob left the chat" was shown


def convo_key(name: str) -> str:
    """Rooms by their name, private conversations by "@nick", case-insensitively."""
    return nick_key(name) if name.startswith("#") else "@" + nick_key(name)


class ChatWindow:
    """The main window: conversations, sidebar, input box, status bar."""

    def __init__(self, master: Any, net: Any, *, host: str = "", port: int = 0,
                 notifier: Notifier | None = None, open_url: Callable[[str], Any] | None = None,
                 save_ignored: Callable[[set[str]], None] | None = None,
                 recent_emoji: list[str] | None = None,
                 save_recent: Callable[[list[str]], None] | None = None):
        import tkinter as tk
        self.tk = tk
        self.master = master
        self.net = net
        self.address = f"{host}:{port}"
        self.convos: dict[str, Conversation] = {}
        self.listed: list[str] = []          # the nicks the sidebar shows
        self.current = ""
        self.save_ignored = save_ignored or (lambda keys: None)
        self.notifier = notifier or Notifier()
        self.open_url = open_url or _open_in_browser
        self.sent: list[str] = []          # input history for Up / Down
        self.sent_pos = 0
        self.typing_since: dict[str, float] = {}
        self.pending: list[str] = []
        self.unread = 0                    # for the title while the window is unfocused
        self.focused = True
        self.closing = False
        self.connected = False
        self.was_connected = False         # the banner only shows a link we had and lost
        self.offline = False               # the server is unreachable: banner, grey lists
        self._after: str | None = None
        self._focus_after: str | None = None
        self._darken_after: str | None = None  # the file dialog's colouring, pending
        self._link_count = 0
        self.links: dict[str, str] = {}    # url tag -> address
        self.draft = ""                    # what was typed before Up started recalling
        self.download_dir: Path | None = None  # None: the Downloads folder
        self.files: dict[str, dict] = {}   # transfer id -> its convo, name and widgets
        self.thumbnails: collections.deque = collections.deque(maxlen=50)  # keep images alive
        self.open_folder: Callable[[Path], Any] = _open_folder
        self._pick_fonts(recent_emoji or [])
        self.save_recent = save_recent or (lambda chars: None)
        master.title("PyChat")
        master.configure(bg=THEME["bg"])
        master.minsize(640, 420)
        self._build_header()
        self._build_statusbar()
        self._build_body()
        master.protocol("WM_DELETE_WINDOW", self.close)
        master.bind("<FocusIn>", self._focus_in, add="+")
        master.bind("<FocusOut>", self._focus_out, add="+")
        self.set_status("Connected" if net else "Not connected", THEME["ok"])
        self.show_convo(self._convo(LOBBY).key)
        self.input.focus_set()
        self._after = master.after(POLL_MS, self._poll)

    def _pick_fonts(self, recent_emoji: list[str]) -> None:
        """The fonts this Tk has: text, emoji (colour where possible), and the
        emoji the picker can offer."""
        import tkinter.font as tkfont
        self.non_bmp = tk_handles_non_bmp(str(self.master.tk.call("info", "patchlevel")))
        families = set(tkfont.families(self.master))
        self.emoji = emoji_groups(self.non_bmp, families)
        self.emoji_font = next((f for f in COLOR_EMOJI_FONTS if f in families), None)
        # Emoji runs in text are drawn with the colour font, where there is one
        # (else a text font's monochrome glyphs would win over the colour ones).
        self.colour_emoji = self.emoji_font is not None and self.emoji_font != "Symbola" \
            and self.non_bmp
        self.recent_emoji = [c for c in recent_emoji if isinstance(c, str)
                             and c in {e for group in self.emoji.values() for e in group}]
        self.emoji_tab = "Recent" if self.recent_emoji else next(iter(self.emoji), "")

        base = tkfont.nametofont("TkDefaultFont").actual()
        self.font = (base["family"], 11)
        self.fonts = {
            "bold": (base["family"], 11, "bold"), "italic": (base["family"], 11, "italic"),
            "small": (base["family"], 9), "title": (base["family"], 13, "bold"),
        }
        # Where a message's text column starts: after "HH:MM  ", under the nick.
        # Wrapped lines, lines after a line break and a sender's follow-ups all
        # start here.
        self.indent = tkfont.Font(self.master, font=self.fonts["small"]).measure("00:00  ")

    @property
    def convo(self) -> Conversation:
        return self.convos[self.current]

    @property
    def chat(self) -> Any:
        """The chat pane on show."""
        return self.convo.text

    @property
    def room(self) -> str:
        return self.convo.name

    @property
    def state(self) -> ClientState:
        """What the client knows (the window only shows it)."""
        return self.net.state

    @property
    def nick(self) -> str:
        return self.state.nick

    @property
    def pinned(self) -> bool:
        return self.convo.pinned

    # --- building
    def _build_header(self) -> None:
        tk = self.tk
        bar = tk.Frame(self.master, bg=THEME["header"], padx=12, pady=8)
        bar.pack(side="top", fill="x")
        self.room_label = tk.Label(bar, text=LOBBY, font=self.fonts["title"],
                                   bg=THEME["header"], fg=THEME["text"])
        self.room_label.pack(side="left")
        self.motd_label = tk.Label(bar, text="", font=self.fonts["small"], bg=THEME["header"],
                                   fg=THEME["dim"])
        self.motd_label.pack(side="left", padx=12)
        self.mute_button = HoverButton(bar, "Sound on", self.toggle_mute, bg=THEME["button"],
                                       hover=THEME["button_hover"], font=self.fonts["small"])
        self.mute_button.widget.configure(highlightbackground=THEME["header"])
        self.mute_button.widget.pack(side="right")
        # Shown across the top of every conversation while the server is away.
        self.banner = tk.Label(self.master, text="", anchor="w", padx=14, pady=6,
                               bg=THEME["mention_bar"], fg=THEME["header"],
                               font=self.fonts["bold"])

    def _build_body(self) -> None:
        tk = self.tk
        body = self.body = tk.Frame(self.master, bg=THEME["bg"])
        body.pack(side="top", fill="both", expand=True)
        body.columnconfigure(0, weight=1)
        body.rowconfigure(0, weight=1)
        # The conversations' chat panes are stacked here; the one on show is raised.
        self.pane_holder = tk.Frame(body, bg=THEME["bg"])
        self.pane_holder.grid(row=0, column=0, sticky="nsew")
        self.pane_holder.rowconfigure(0, weight=1)
        self.pane_holder.columnconfigure(0, weight=1)
        from tkinter import ttk
        style = ttk.Style(self.master)
        if style.theme_use() != "clam":  # the built-in theme that takes colours everywhere
            style.theme_use("clam")
        style.configure("Chat.Vertical.TScrollbar", background=THEME["side"],
                        troughcolor=THEME["bg"], bordercolor=THEME["bg"],
                        arrowcolor=THEME["dim"], lightcolor=THEME["side"],
                        darkcolor=THEME["side"], gripcount=0, arrowsize=10)
        style.map("Chat.Vertical.TScrollbar", background=[("active", THEME["button"])])
        # A slim scrollbar: trough and thumb only, no arrow buttons.
        style.layout("Chat.Vertical.TScrollbar", [("Vertical.Scrollbar.trough", {
            "sticky": "ns", "children": [("Vertical.Scrollbar.thumb",
                                          {"expand": "1", "sticky": "nswe"})]})])
        # The thumb must stand out from the trough (#1a1b1e on #313338 did not).
        style.configure("Chat.Vertical.TScrollbar", background=THEME["thumb"], width=8)
        style.map("Chat.Vertical.TScrollbar", background=[("active", THEME["button_hover"])])
        # File-transfer bars: a dark trough, the accent while running, green once done.
        for name, colour in (("Chat", THEME["accent"]), ("Done", THEME["ok"]),
                             ("Failed", THEME["error"])):
            style.configure(f"{name}.Horizontal.TProgressbar", troughcolor=THEME["header"],
                            background=colour, bordercolor=THEME["header"],
                            lightcolor=colour, darkcolor=colour, thickness=8)
        self._dark_ttk(style)
        self.master.update_idletasks()  # run Tk's <<ThemeChanged>> now, while we exist
        # Typing notice and pending messages under the pane.
        self.typing_label = tk.Label(body, text="", anchor="w", font=self.fonts["small"],
                                     bg=THEME["bg"], fg=THEME["dim"], padx=16)
        self.typing_label.grid(row=1, column=0, sticky="ew")
        self.pending_label = tk.Label(body, text="", anchor="w", font=self.fonts["small"],
                                      bg=THEME["bg"], fg=THEME["pending"], padx=16,
                                      justify="left")
        self.pending_label.grid(row=2, column=0, sticky="ew")
        # Input row: a Text (not an Entry: see bmp_only) plus the buttons.
        row = tk.Frame(body, bg=THEME["bg"], padx=12, pady=10)
        row.grid(row=3, column=0, sticky="ew")
        row.columnconfigure(0, weight=1)
        self.input = tk.Text(row, height=INPUT_MIN_LINES, wrap="word", bg=THEME["input"],
                             fg=THEME["text"],
                             font=self.font, relief="flat", padx=10, pady=8, undo=True,
                             insertbackground=THEME["text"], highlightthickness=2,
                             highlightbackground=THEME["input"], highlightcolor=THEME["accent"])
        self.input.grid(row=0, column=0, sticky="ew")
        # "12 lines": how long a draft is that no longer fits the box.
        self.lines_label = tk.Label(row, text="", anchor="e", bg=THEME["bg"], fg=THEME["dim"],
                                    font=self.fonts["small"])
        self.lines_label.grid(row=1, column=0, sticky="e")
        self.lines_label.grid_remove()
        emoji_label = "😊" if self.emoji_font and self.non_bmp else "☺"
        self.emoji_button = HoverButton(row, emoji_label, self.toggle_emoji,
                                        bg=THEME["button"], hover=THEME["button_hover"],
                                        font=(self.emoji_font or self.font[0], 12))
        self.emoji_button.widget.grid(row=0, column=1, padx=(8, 0), sticky="sew")
        self.file_button = HoverButton(row, "📎" if self.emoji_font and self.non_bmp else "File",
                                       self.choose_file, bg=THEME["button"],
                                       hover=THEME["button_hover"],
                                       font=(self.emoji_font or self.font[0], 12))
        self.file_button.widget.grid(row=0, column=2, padx=(8, 0), sticky="sew")
        self.send_button = HoverButton(row, "Send", self.send_input, bg=THEME["accent"],
                                       hover=THEME["accent_hover"], font=self.fonts["bold"])
        self.send_button.widget.grid(row=0, column=3, padx=(8, 0), sticky="sew")
        self.input.bind("<Return>", self._on_return)
        self.input.bind("<Shift-Return>", self._on_shift_return)
        self.input.bind("<KP_Enter>", self._on_return)
        self.input.bind("<Up>", self._on_up)
        self.input.bind("<Down>", self._on_down)
        self.input.bind("<Tab>", self._on_tab)
        self.input.bind("<Control-Tab>", lambda e: (self.input.tk_focusNext().focus_set(),
                                                    "break")[1])
        self.input.bind("<Escape>", lambda e: self.close_emoji())
        # Logical line start/end: Tk's display-line moves can land inside a
        # surrogate pair on wrapped lines (see README, "Emoji").
        self.input.bind("<Home>", lambda e: self._move_cursor("insert linestart"))
        self.input.bind("<End>", lambda e: self._move_cursor("insert lineend"))
        self.input.bind("<KeyRelease>", self._on_key_release)
        self.input.bind("<<Modified>>", self._on_input_modified)
        self.input.bind("<Configure>", lambda e: self._fit_input(), add="+")
        if self.colour_emoji:  # the draft's emoji in colour too (see _fit_input)
            self.input.tag_configure("emoji", font=(self.emoji_font, self.font[1]))
        self.emoji_panel: Any = None
        # A click anywhere outside the emoji picker closes it (Tk gives every
        # widget's events to its toplevel's bindings too).
        self.master.bind("<ButtonPress>", self._click_outside_emoji, add="+")
        # Sidebar: who is here.
        side = tk.Frame(body, bg=THEME["side"], width=190, padx=10, pady=10)
        side.grid(row=0, column=1, rowspan=4, sticky="ns")
        side.grid_propagate(False)
        side.rowconfigure(3, weight=1)
        side.columnconfigure(0, weight=1)
        listbox = dict(bg=THEME["side"], fg=THEME["text"], relief="flat", highlightthickness=0,
                       bd=0, activestyle="none", selectbackground=THEME["input"],
                       selectforeground=THEME["text"], font=self.font, takefocus=False,
                       exportselection=False)
        tk.Label(side, text="CONVERSATIONS", anchor="w", bg=THEME["side"], fg=THEME["dim"],
                 font=self.fonts["small"]).grid(row=0, column=0, sticky="ew", pady=(0, 4))
        # As tall as its items (see _refresh_convos): no gap above ONLINE.
        # selectborderwidth pads every item (a Listbox has no other padding);
        # the conversation on show is marked by its background, not the
        # selection, whose padding Tk draws as a raised 3D border.
        self.convo_list = tk.Listbox(side, height=1, selectborderwidth=5, **listbox)
        self.convo_list.grid(row=1, column=0, sticky="ew", pady=(0, 12))
        self.convo_list.bind("<<ListboxSelect>>", self._on_convo_select)
        self.count_label = tk.Label(side, text="ONLINE — 0", anchor="w", bg=THEME["side"],
                                    fg=THEME["dim"], font=self.fonts["small"])
        self.count_label.grid(row=2, column=0, sticky="ew", pady=(0, 6))
        self.user_list = tk.Listbox(side, **listbox)
        self.user_list.grid(row=3, column=0, sticky="nsew")
        self.user_list.bind("<Double-Button-1>", self._on_user_double_click)

    def _build_statusbar(self) -> None:
        tk = self.tk
        bar = tk.Frame(self.master, bg=THEME["header"], padx=12, pady=3)
        bar.pack(side="bottom", fill="x")
        self.status_dot = tk.Label(bar, text="●", bg=THEME["header"], fg=THEME["ok"],
                                   font=self.fonts["small"])
        self.status_dot.pack(side="left")
        self.status_label = tk.Label(bar, text="", anchor="w", bg=THEME["header"],
                                     fg=THEME["dim"], font=self.fonts["small"])
        self.status_label.pack(side="left", fill="x", expand=True)

    def _dark_ttk(self, style: Any) -> None:
        """Dark defaults for ttk widgets PyChat does not style itself: those of
        Tk's own file dialog on X11 (frames, labels, buttons, entries, combobox)."""
        bg, fg, field = THEME["side"], THEME["text"], THEME["input"]
        style.configure(".", background=bg, foreground=fg, fieldbackground=field,
                        bordercolor=THEME["header"], lightcolor=bg, darkcolor=bg,
                        troughcolor=THEME["header"], arrowcolor=THEME["dim"],
                        selectbackground=THEME["accent"], selectforeground="#ffffff",
                        insertcolor=fg)
        style.map(".", background=[("disabled", bg), ("active", THEME["button_hover"])],
                  foreground=[("disabled", THEME["dim"])])
        style.configure("TEntry", fieldbackground=field, foreground=fg)
        style.configure("TButton", background=THEME["button"])
        style.map("TButton", background=[("disabled", bg), ("pressed", THEME["accent"]),
                                         ("active", THEME["button_hover"])],
                  foreground=[("disabled", THEME["dim"])])
        style.map("TCombobox", fieldbackground=[("readonly", field)])
        for pattern, value in (("*TkFDialog*foreground", fg), ("*TkFDialog*background", bg),
                               ("*TkFDialog*Menu.background", field)):
            self.master.option_add(pattern, value)

    def _convo(self, name: str) -> Conversation:
        """The conversation for a room or a nick, made (with its pane) on first use."""
        key = convo_key(name)
        convo = self.convos.get(key)
        if convo is not None:
            return convo
        tk = self.tk
        from tkinter import ttk
        frame = tk.Frame(self.pane_holder, bg=THEME["bg"])
        frame.grid(row=0, column=0, sticky="nsew")
        frame.rowconfigure(0, weight=1)
        frame.columnconfigure(0, weight=1)
        text = tk.Text(frame, wrap="word", state="disabled", bg=THEME["bg"],
                       fg=THEME["text"], font=self.font, relief="flat", padx=14, pady=10,
                       spacing1=2, spacing3=2, cursor="arrow", highlightthickness=0,
                       insertwidth=0, takefocus=False)
        convo = Conversation(key, name, frame, text)
        scroll = ttk.Scrollbar(frame, style="Chat.Vertical.TScrollbar",
                               command=lambda *a: self._scroll(convo, *a))
        text.configure(yscrollcommand=scroll.set)
        text.grid(row=0, column=0, sticky="nsew")
        scroll.grid(row=0, column=1, sticky="ns")
        # Stay at the newest line through resizes; let go when the user scrolls up.
        text.bind("<Configure>", lambda e: convo.pinned and text.see("end"))
        for wheel in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
            text.bind(wheel, lambda e: self.master.after_idle(self._update_pinned, convo),
                      add="+")
        self._configure_tags(text)
        self.convos[key] = convo
        if self.current:
            self.convos[self.current].frame.tkraise()
        self._refresh_convos()
        return convo

    def show_convo(self, key: str) -> None:
        """Bring a conversation to the front."""
        convo = self.convos[key]
        self.current = key
        convo.frame.tkraise()
        convo.unread = 0
        self.room_label.configure(text=tk_safe(convo.name if convo.is_room
                                               else f"@ {convo.name}"))
        self.motd_label.configure(text=tk_safe(convo.topic[:120]))
        self.typing_since.clear()
        self._show_typing()
        self._refresh_convos()
        self._refresh_users()
        self._update_title()
        if convo.pinned:
            convo.text.see("end")

    def close_convo(self, key: str) -> None:
        convo = self.convos.pop(key, None)
        if convo is None:
            return
        convo.frame.destroy()
        if self.current == key:
            self.current = ""
            self.show_convo(next(iter(self.convos)) if self.convos
                            else self._convo(LOBBY).key)
        else:
            self._refresh_convos()

    def _refresh_convos(self) -> None:
        keys = sorted(self.convos, key=lambda k: (not k.startswith("#"), k))
        self._convo_keys = keys
        self.convo_list.configure(height=max(1, min(len(keys), 8)))
        self.convo_list.delete(0, "end")
        for i, key in enumerate(keys):
            convo = self.convos[key]
            label = convo.name if convo.is_room else f"@ {convo.name}"
            gone = not convo.is_room and not self.state.here(convo.name)
            if gone:
                label += "  (left)"
            if convo.unread:
                label += f"  ({convo.unread})"
            self.convo_list.insert("end", tk_safe(label))
            self.convo_list.itemconfigure(i, foreground=THEME["text"] if convo.unread
                                          and not gone and not self.offline else THEME["dim"])
            if key == self.current:
                self.convo_list.itemconfigure(i, background=THEME["input"])

    def _on_convo_select(self, event: Any) -> None:
        chosen = self.convo_list.curselection()
        if chosen and chosen[0] < len(self._convo_keys):
            self.show_convo(self._convo_keys[chosen[0]])
            self.input.focus_set()  # what is typed next goes into the message box

    def _on_user_double_click(self, event: Any) -> None:
        chosen = self.user_list.curselection()
        if chosen:
            names = self.user_names()
            if chosen[0] < len(names) and nick_key(names[chosen[0]]) != nick_key(self.nick):
                self.show_convo(self._convo(names[chosen[0]]).key)
                self.input.focus_set()

    def _configure_tags(self, c: Any) -> None:
        c.tag_configure("time", foreground=THEME["dim"], font=self.fonts["small"])
        c.tag_configure("system", foreground=THEME["dim"], font=self.fonts["italic"])
        c.tag_configure("error", foreground=THEME["error"])
        c.tag_configure("action", font=self.fonts["italic"])
        c.tag_configure("nick", font=self.fonts["bold"])
        c.tag_configure("mention", background=THEME["mention"])
        c.tag_configure("link", foreground=THEME["link"], underline=True)
        c.tag_bind("link", "<Enter>", lambda e: c.configure(cursor="hand2"))
        c.tag_bind("link", "<Leave>", lambda e: c.configure(cursor="arrow"))
        c.tag_configure("marker", foreground=THEME["marker"], font=self.fonts["small"],
                        justify="center")
        # Wrapped lines, the lines after a line break ("cont") and a sender's
        # follow-up messages ("cont" too) start at the text column.
        c.tag_configure("body", lmargin2=self.indent)
        c.tag_configure("cont", lmargin1=self.indent, lmargin2=self.indent)
        # A follow-up keeps its time and nick in the text (copying, searching)
        # but hides them, like Discord's grouped messages.
        c.tag_configure("grouped", elide=True)
        # /help: usage and description in two columns, wrapped lines under the second.
        c.tag_configure("help", foreground=THEME["dim"], font=self.font)
        c.tag_configure("help_usage", foreground=THEME["text"], font=self.fonts["bold"])
        if self.colour_emoji:
            c.tag_configure("emoji", font=(self.emoji_font, self.font[1]))
            c.tag_raise("emoji")  # above "nick", "action" and "system", whose fonts it replaces
        c.tag_bind("link", "<Button-1>", self._click_link)

    # --- chat pane
    def _emoji_parts(self, text: str, tags: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """text split into runs, emoji runs tagged "emoji" (when drawn in colour)."""
        if not self.colour_emoji:
            return [(text, tags)]
        parts, pos = [], 0
        for start, end in emoji_runs(text):
            if start > pos:
                parts.append((text[pos:start], tags))
            parts.append((text[start:end], tags + ("emoji",)))
            pos = end
        if pos < len(text):
            parts.append((text[pos:], tags))
        return parts

    def _append(self, parts: list[tuple[str, tuple[str, ...]]],
                line_tags: tuple[str, ...] = (), convo: Conversation | None = None) -> None:
        """Append one line made of (text, tags) parts, only ever at the end.
        Anything but a message ends the sender's run (add_message sets it again)."""
        convo = convo or self.convo
        convo.run = None
        c = convo.text
        c.configure(state="normal")
        for text, tags in parts:
            for run, run_tags in self._emoji_parts(tk_safe(text, self.non_bmp), tags):
                c.insert("end", run, run_tags)
        c.insert("end", "\n", line_tags)  # a tagged newline colours the whole row
        lines = int(c.index("end-1c").split(".")[0])
        if lines > MAX_CHAT_LINES:  # trim whole lines from the top
            c.delete("1.0", f"{lines - MAX_CHAT_LINES}.0")
        c.configure(state="disabled")
        if convo.pinned:
            c.see("end")

    def add_system(self, text: str, tag: str = "system", ts: Any = None,
                   convo: Conversation | None = None) -> None:
        self._append([(clock(ts) + "  ", ("time",)), (text, (tag,))], convo=convo)

    def add_help(self, rows: list[tuple[str, str]], convo: Conversation | None = None) -> None:
        """Help as two aligned columns (usage, description): a tab stop on the
        "help" tag, and wrapped descriptions start under the second column.
        A usage too wide for the first column gets its description below it."""
        import tkinter.font as tkfont
        convo = convo or self.convo
        bold, plain = (tkfont.Font(self.master, font=f) for f in (self.fonts["bold"], self.font))
        widths = [bold.measure(u) for u, d in rows if u and d]
        column = min(max(widths, default=0), 260) + plain.measure("    ")
        tag = f"help{column}"
        convo.text.tag_configure(tag, tabs=(column,), lmargin2=column)
        for usage, description in rows:
            if not usage:  # prose, the whole width
                self._append([(description, ("help",))], convo=convo)
            elif not description or bold.measure(usage) + plain.measure("  ") > column:
                self._append([(usage, ("help_usage",))], convo=convo)
                if description:
                    self._append([("\t" + description, ("help", tag))], convo=convo)
            else:
                self._append([(usage, ("help_usage", tag)), ("\t" + description, ("help", tag))],
                             convo=convo)

    def add_marker(self, convo: Conversation) -> None:
        self.remove_marker(convo)
        self._append([("──────── new messages ────────", ("marker", "marker_line"))],
                     convo=convo)

    def remove_marker(self, convo: Conversation) -> None:
        ranges = convo.text.tag_ranges("marker_line")
        if ranges:
            convo.text.configure(state="normal")
            convo.text.delete(ranges[0], f"{ranges[-1]}+1c")
            convo.text.configure(state="disabled")

    def add_message(self, m: dict, convo: Conversation | None = None) -> None:
        convo = convo or self.convo
        who = str(m.get("from", "?"))
        text = str(m.get("text", ""))
        mention = who != self.nick and mentions(text, self.nick)
        line: tuple[str, ...] = ("body", "mention") if mention else ("body",)
        colour = "fg" + nick_hex(who)
        if colour not in convo.colours:
            convo.colours.add(colour)
            convo.text.tag_configure(colour, foreground=colour[2:])
        ts = m.get("ts")
        when = float(ts) if isinstance(ts, (int, float)) and math.isfinite(ts) else time.time()
        run = convo.run
        # A follow-up from the same sender within GROUP_SECONDS shows only its
        # text, at the text column; an action, a system line or a gap ends the run.
        grouped = (not m.get("action") and run is not None and run[0] == nick_key(who)
                   and 0 <= when - run[1] <= GROUP_SECONDS)
        if grouped:
            line += ("cont",)
        head = ("grouped",) if grouped else ()
        parts: list[tuple[str, tuple[str, ...]]] = [
            (clock(m.get("ts")) + "  ", ("time",) + line + head)]
        if m.get("action"):
            parts.append((f"* {who} ", ("nick", colour, "action") + line))
            body_tags = ("action",) + line
        else:
            parts.append((who, ("nick", colour) + line + head))
            parts.append(("  ", line + head))
            body_tags = line
        # Lines after a line break in the message start at the text column too.
        if "\n" in text:
            cut = text.index("\n") + 1
            text_parts = self._message_parts(text, body_tags)
            shaped: list[tuple[str, tuple[str, ...]]] = []
            pos = 0
            for piece, tags in text_parts:
                end = pos + len(piece)
                if end <= cut:
                    shaped.append((piece, tags))
                elif pos >= cut:
                    shaped.append((piece, tags + ("cont",)))
                else:
                    shaped += [(piece[:cut - pos], tags), (piece[cut - pos:], tags + ("cont",))]
                pos = end
            parts += shaped
        else:
            parts += self._message_parts(text, body_tags)
        self._append(parts, line, convo)
        if not m.get("action"):
            convo.run = (nick_key(who), when)

    def _message_parts(self, text: str,
                       body_tags: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """A message's text as (text, tags) parts, its links made clickable."""
        parts: list[tuple[str, tuple[str, ...]]] = []
        pos = 0
        for start, end, url in find_urls(text):
            if start > pos:
                parts.append((text[pos:start], body_tags))
            self._link_count += 1
            tag = f"url{self._link_count}"
            self.links[tag] = url
            if len(self.links) > MAX_CHAT_LINES:  # forget links long scrolled away
                for old in list(self.links)[:MAX_CHAT_LINES // 2]:
                    del self.links[old]
            parts.append((text[start:end], body_tags + ("link", tag)))
            pos = end
        parts.append((text[pos:], body_tags))
        return parts

    def _scroll(self, convo: Conversation, *args: Any) -> None:
        convo.text.yview(*args)
        self._update_pinned(convo)

    def _update_pinned(self, convo: Conversation) -> None:
        if not self.closing and convo.key in self.convos:
            convo.pinned = convo.text.yview()[1] >= 0.999

    def _click_link(self, event: Any) -> None:
        for tag in event.widget.tag_names("current"):
            if tag in self.links:
                self.open_url(self.links[tag])
                return

    # --- events from the network
    def _poll(self) -> None:
        self._after = None
        if self.closing:
            return
        try:
            for _ in range(EVENTS_PER_POLL):
                try:
                    event = self.net.events.get_nowait()
                except queue.Empty:
                    break
                try:
                    self.handle_event(event)
                except Exception:  # one odd event must not stop the window listening
                    log.exception("could not show event %.200r", event)
            if self.notifier.needs_bell:
                self.notifier.needs_bell = False
                self.master.bell()
            self._expire_typing()
        finally:
            self._after = self.master.after(POLL_MS, self._poll)

    def handle_event(self, e: dict) -> None:
        """Show one event from the client core."""
        kind = e.get("type")
        handler = getattr(self, f"on_{kind}", None) if isinstance(kind, str) else None
        if handler is not None:
            handler(e)

    def _room_convo(self, e: dict) -> Conversation:
        return self._convo(str(e.get("room") or LOBBY))

    def on_welcome(self, e: dict) -> None:
        self.was_connected = True
        lobby = self._convo(str(e.get("room", LOBBY)))
        if e.get("motd"):
            lobby.topic = lobby.topic or str(e["motd"])
        if not e.get("first", True):
            for convo in self.convos.values():  # what we missed gets the unread marker
                convo.marker_pending = convo.is_room
        else:
            self.add_system(f"You are {self.nick} in {lobby.name}. Type /help for commands.",
                            convo=lobby)
        self.show_convo(self.current or lobby.key)

    def on_history(self, e: dict) -> None:
        convo = self._room_convo(e)
        for m in e.get("messages", []):
            if isinstance(m, dict):
                self._place_marker(convo)
                self.add_message(m, convo)
        convo.marker_pending = False

    def on_users(self, e: dict) -> None:
        self._room_convo(e)  # the sidebar follows the state event after this one

    def on_join(self, e: dict) -> None:
        convo = self._room_convo(e)
        nick = str(e.get("nick", ""))
        via = f" (on {e['via']})" if e.get("via") else ""
        self.add_system(f"{nick} joined {convo.name}{via}", ts=e.get("ts"), convo=convo)
        private = self.convos.get(convo_key(nick))
        if private is not None and private.said_gone:
            private.said_gone = False
            self.add_system(f"{nick} is back in the chat.", ts=e.get("ts"), convo=private)

    def on_leave(self, e: dict) -> None:
        convo = self._room_convo(e)
        nick = str(e.get("nick", ""))
        if e.get("you") and e.get("reason") == "part":
            self.close_convo(convo.key)
            self.add_system(f"You left {convo.name}")
            return
        self.typing_since.pop(nick, None)
        why = f"{e.get('reason')}: {e['message']}" if e.get("message") else e.get("reason")
        self.add_system(f"{nick} left ({why})", ts=e.get("ts"), convo=convo)
        private = self.convos.get(convo_key(nick))
        if private is not None and not self.state.here(nick) and not private.said_gone:
            private.said_gone = True  # once, not once per room they were in
            self.add_system(f"{nick} left the chat ({why}).", ts=e.get("ts"), convo=private)

    def on_nick(self, e: dict) -> None:
        old, new = str(e.get("old", "")), str(e.get("new", ""))
        text = f"You are now known as {new}" if e.get("you") else f"{old} is now known as {new}"
        shown = False
        for convo in list(self.convos.values()):
            if convo.is_room and (e.get("you") or new in self.state.members(convo.name)):
                self.add_system(text, ts=e.get("ts"), convo=convo)
                shown = shown or convo is self.convo
        private = self.convos.pop("@" + nick_key(old), None)
        if private is not None:  # the private conversation follows the new nick
            private.key, private.name = "@" + nick_key(new), new
            self.convos[private.key] = private
            if self.current == "@" + nick_key(old):
                self.current = private.key
            self.add_system(text, ts=e.get("ts"), convo=private)
        self.typing_since.pop(old, None)
        if e.get("you"):
            if not shown:
                self.add_system(text, ts=e.get("ts"))
            self.set_status(f"Connected to {self.address} as {new}.", THEME["ok"])
        self.show_convo(self.current)

    def on_state(self, e: dict) -> None:
        """The client's state changed: show it again."""
        part = e.get("part")
        if part == "transfers":
            self._refresh_transfers()
            return
        if part in ("people", "connection", "rooms"):
            self._refresh_convos()
        self._refresh_users()
        self._update_title()

    def _arrived(self, convo: Conversation, e: dict) -> None:
        """A message for a conversation: unread counts, marker, ding."""
        who = str(e.get("from", ""))
        self.typing_since.pop(who, None)
        mine = bool(e.get("you"))
        if not mine:
            away = not self.focused or convo is not self.convo
            if away:
                if convo.unread == 0 and not self.focused:
                    convo.marker_pending = True
                convo.unread += 1
            if not self.focused:
                self.unread += 1
        self._place_marker(convo)
        self.add_message(e, convo)
        if not mine:
            private = e.get("type") == "pm"
            if not self.focused or private or mentions(str(e.get("text", "")), self.nick):
                self.notifier.ding()
        self._refresh_convos()
        self._update_title()

    def on_msg(self, e: dict) -> None:
        self._arrived(self._room_convo(e), e)

    def on_pm(self, e: dict) -> None:
        other = str(e.get("to") if e.get("you") else e.get("from"))
        convo = self._convo(other)
        convo.said_gone = False
        self._arrived(convo, e)

    def on_topic(self, e: dict) -> None:
        convo = self._room_convo(e)
        convo.topic = str(e.get("topic") or "")
        if convo.topic:
            self.add_system(f"Topic: {convo.topic} (set by {e.get('by')})", ts=e.get("ts"),
                            convo=convo)
        if convo is self.convo:
            self.motd_label.configure(text=tk_safe(convo.topic[:120]))

    def on_rooms(self, e: dict) -> None:
        rooms = [r for r in e.get("rooms", []) if isinstance(r, dict)]
        self.add_system(f"{len(rooms)} rooms (/join one):")
        for r in rooms:
            topic = f" — {r['topic']}" if r.get("topic") else ""
            self.add_system(f"   {r.get('room')}  ({r.get('users')} here){topic}")

    def on_notice(self, e: dict) -> None:
        nick = e.get("nick")
        convo = self.convos.get("@" + nick_key(str(nick))) if nick else \
            self._room_convo(e) if e.get("room") else None  # (a netsplit: in its room)
        self.add_system(str(e.get("text", "")), convo=convo)

    def on_whois(self, e: dict) -> None:
        self.add_system(str(e.get("text", "")))

    on_stats = on_whois

    def on_away(self, e: dict) -> None:
        if e.get("you"):
            self.add_system("You are marked away." if e.get("away") else "Welcome back.")

    def on_op(self, e: dict) -> None:
        self.add_system("You are now an operator: /kick, /ban, /unban, /mute, /unmute.")

    def on_moderation(self, e: dict) -> None:
        action = {"kick": "kicked", "ban": "banned", "unban": "unbanned", "mute": "muted",
                  "unmute": "unmuted"}.get(str(e.get("action")), str(e.get("action")))
        why = f": {e['reason']}" if e.get("reason") else ""
        self.add_system(f"{e.get('nick')} was {action} by {e.get('by')}{why}", "error",
                        ts=e.get("ts"))

    def on_typing(self, e: dict) -> None:
        nick = str(e.get("nick", ""))
        if nick and nick_key(nick) != nick_key(self.nick) and \
                convo_key(str(e.get("room") or LOBBY)) == self.current:
            self.typing_since[nick] = time.monotonic()
            self._show_typing()

    def on_status(self, e: dict) -> None:
        state = e.get("state")
        message = str(e.get("message", ""))
        colour = {"connected": THEME["ok"], "connecting": THEME["mention_bar"]}.get(
            str(state), THEME["error"])
        self.set_status(message, colour)
        if state == "disconnected" and self.connected:
            self.add_system(message, "error")
        elif state == "connected" and not self.connected and self.chat.index("end-1c") != "1.0":
            self.add_system(message)
        self.connected = state == "connected"
        self.was_connected = self.was_connected or self.connected
        if state == "connected":
            self._set_state(offline=False)
        elif state in ("disconnected", "connecting") and self.was_connected:
            self._set_state(offline=True, why=message)

    def _set_state(self, offline: bool, why: str = "") -> None:
        """While the server is away: a banner over every conversation and grey
        lists (what they show may be out of date); all back once reconnected."""
        self.offline = offline
        if offline:
            why = re.sub(r"^Disconnected: ", "", why) or "reconnecting..."
            self.banner.configure(text=tk_safe(f"⚠  Not connected — {why}"))
            if not self.banner.winfo_ismapped():
                self.banner.pack(side="top", fill="x", before=self.body)
        else:
            self.banner.pack_forget()
        self._refresh_convos()
        self._refresh_users()

    def on_outbox(self, e: dict) -> None:
        pending = [str(t) for t in e.get("pending", [])]
        self.pending = pending
        if not pending:
            self.pending_label.configure(text="")
            return
        shown = "; ".join(p.replace("\n", " ")[:40] for p in pending[:3])
        more = f" (+{len(pending) - 3} more)" if len(pending) > 3 else ""
        self.pending_label.configure(
            text=tk_safe(f"⏳ Not delivered yet ({len(pending)}): {shown}{more}"))

    # --- files
    def choose_file(self) -> None:
        from tkinter import filedialog
        self._quiet_file_dialog()
        path = filedialog.askopenfilename(parent=self.master, title="Send a file",
                                          initialdir=str(Path.home()))
        if path:
            self.offer_file(path)

    def _quiet_file_dialog(self) -> None:
        """Tk's own file dialog (X11): dark, hidden files hidden, with a button
        to show them.  Its variables exist once its script is loaded, which an
        invalid option forces; other platforms' native dialogs ignore them."""
        call = self.master.tk.call
        try:
            try:
                call("tk_getOpenFile", "-no-such-option")
            except self.tk.TclError:
                pass
            call("set", "::tk::dialog::file::showHiddenBtn", "1")
            call("set", "::tk::dialog::file::showHiddenVar", "0")
        except self.tk.TclError:
            pass
        # Its file list is a canvas made with a white background (iconlist.tcl):
        # darken it once it exists (the dialog waits in a nested event loop, so
        # after() callbacks still run).
        canvas = str(self.master).rstrip(".") + ".__tk_filedialog.contents.icons.cHull.canvas"

        def darken(tries: int = 40) -> None:
            self._darken_after = None
            try:
                call(canvas, "configure", "-background", THEME["input"])
            except self.tk.TclError:
                if tries and not self.closing:
                    self._darken_after = self.master.after(25, darken, tries - 1)
        self._darken_after = self.master.after(25, darken)

    def offer_file(self, path: str, to: str | None = None) -> None:
        """Offer a file in the current conversation (a room, or one person), or
        to `to`."""
        target = Path(path).expanduser()
        if not target.is_file():
            what = "it is a folder" if target.is_dir() else "there is no such file"
            self.add_system(f"Cannot send {path}: {what}.", "error")
            return
        if to is not None:
            self.net.send_file(str(target), to, None)
        elif self.convo.is_room:
            self.net.send_file(str(target), None, self.convo.name)
        else:
            self.net.send_file(str(target), self.convo.name, None)

    def _file_convo(self, e: dict) -> Conversation:
        if e.get("room"):
            return self._convo(str(e["room"]))
        other = e.get("to") if e.get("mine") else e.get("from")
        return self._convo(str(other or LOBBY))

    def _embed(self, convo: Conversation, widgets: list[Any], text: str = "",
               tag: str = "system") -> None:
        """A chat line holding widgets (buttons, a progress bar), after some text."""
        convo.run = None
        c = convo.text
        c.configure(state="normal")
        c.insert("end", clock(None) + "  ", ("time",))
        if text:
            c.insert("end", tk_safe(text, self.non_bmp) + "  ", (tag,))
        for w in widgets:
            c.window_create("end", window=w, padx=3)
        c.insert("end", "\n")
        c.configure(state="disabled")
        if convo.pinned:
            c.see("end")

    def _button(self, master: Any, text: str, command: Callable[[], None],
                colour: str = "button") -> Any:
        master = master.text if isinstance(master, Conversation) else master
        return HoverButton(master, text, command, bg=THEME[colour],
                           hover=THEME["accent_hover" if colour == "accent" else "button_hover"],
                           font=self.fonts["small"]).widget

    def on_file_offer(self, e: dict) -> None:
        tid, name = str(e.get("id")), str(e.get("name"))
        convo = self._file_convo(e)
        self.files[tid] = {"convo": convo, "name": name, "size": int(e.get("size") or 0)}
        size = format_size(int(e.get("size") or 0))
        if e.get("mine"):
            cancel = self._button(convo, "Cancel", lambda: self.cancel_file(tid))
            status = self.tk.Label(convo.text, text="waiting for answers", bg=THEME["bg"],
                                   fg=THEME["dim"], font=self.fonts["small"])
            self.files[tid].update(answer=[cancel], status=status)
            self._embed(convo, [status, cancel], f"You offer {name} ({size}):")
            return
        accept = self._button(convo, "Accept", lambda: self.accept_file(tid), "accent")
        decline = self._button(convo, "Decline", lambda: self.decline_file(tid))
        status = self.tk.Label(convo.text, text="", bg=THEME["bg"], fg=THEME["dim"],
                               font=self.fonts["small"])
        self.files[tid].update(answer=[accept, decline], status=status)
        self._embed(convo, [accept, decline, status], f"{e.get('from')} offers {name} ({size})")
        if not self.focused or convo is not self.convo:
            convo.unread += 1
            self._refresh_convos()
        if not self.focused or e.get("to"):
            self.notifier.ding()

    def accept_file(self, tid: str) -> None:
        info = self.files.get(tid)
        if info is None or "answer" not in info or info.get("rows"):
            self.add_system(f"No file offer {tid} is waiting for you. /files lists them.",
                            "error")
            return
        for w in info.pop("answer", []):
            w.destroy()
        self.net.accept_file(tid, info["name"], self.download_dir)
        self._progress_row(tid, "in", "")

    def cancel_file(self, tid: str) -> None:
        info = self.files.get(tid)
        shown = self.state.transfer(tid)
        if info is None or shown is None:
            self.add_system(f"No transfer {tid}. /files lists them.", "error")
            return
        if shown["state"] in FINAL:
            self.add_system(f"{info['name']} has finished ({transfer_summary(shown)}); "
                            "nothing to stop.", convo=info["convo"])
            self._refresh_transfers()
            return
        for w in info.pop("answer", []):
            w.destroy()
        self.net.cancel_file(tid)  # the offer's line, or its progress bar, says so

    def list_files(self) -> None:
        rows = [f"[{t['id']}] {t['name']} ({format_size(t['size'])}) "
                f"{'from' if t['direction'] == 'in' else 'to'} {t['nick']}: "
                f"{transfer_summary(t)}" for t in self.state.transfer_list()]
        self.add_system("Files: " + ("; ".join(rows) or "none"))

    def _refresh_transfers(self) -> None:
        """Our offers' lines say where they stand; a finished one loses Cancel."""
        for tid, info in self.files.items():
            status = info.get("status")
            shown = self.state.transfer(tid)
            if status is None or shown is None or info.get("rows") and \
                    shown["direction"] == "in":
                continue  # an accepted file's progress bar speaks for it
            if shown["direction"] == "in" and shown["state"] == "offered":
                continue  # Accept and Decline are the answer
            final = shown["state"] in FINAL
            colour = THEME["error"] if shown["state"] in ("failed", "cancelled") else \
                THEME["ok"] if final else THEME["dim"]
            status.configure(text=tk_safe(transfer_summary(shown)), fg=colour)
            if final:
                for w in info.pop("answer", []):
                    w.destroy()

    def decline_file(self, tid: str) -> None:
        info = self.files.pop(tid, None)
        if info is None:
            self.add_system(f"No file offer {tid} is waiting for you.", "error")
        else:
            for w in info.pop("answer", []):
                w.destroy()
            self.net.decline_file(tid)
            self.add_system(f"You declined {info['name']}.", convo=info["convo"])

    def _progress_row(self, tid: str, direction: str, nick: str) -> dict | None:
        """The progress bar of one transfer (per receiver when sending)."""
        from tkinter import ttk
        info = self.files.get(tid)
        if info is None:
            return None
        key = f"{direction}:{nick_key(nick)}" if direction == "out" else "in"
        row = info.setdefault("rows", {}).get(key)
        if row is None:
            convo = info["convo"]
            frame = self.tk.Frame(convo.text, bg=THEME["bg"])
            label = self.tk.Label(frame, text=f"{info['name']}: waiting", bg=THEME["bg"],
                                  fg=THEME["dim"], font=self.fonts["small"], anchor="w")
            label.pack(side="top", fill="x")
            bar = ttk.Progressbar(frame, length=260, maximum=100, mode="determinate",
                                  style="Chat.Horizontal.TProgressbar")
            bar.pack(side="left")
            cancel = self._button(frame, "Cancel", lambda: self.net.cancel_file(tid))
            cancel.pack(side="left", padx=8)
            row = info["rows"][key] = {"frame": frame, "label": label, "bar": bar,
                                       "cancel": cancel}
            self._embed(convo, [frame], "" if not nick else ("Sending to " + nick)
                        if direction == "out" else ("From " + nick))
        return row

    def on_file_accept(self, e: dict) -> None:
        info = self.files.get(str(e.get("id")))
        if info is not None:
            self._progress_row(str(e.get("id")), "out", str(e.get("nick")))

    def on_file_progress(self, e: dict) -> None:
        row = self._progress_row(str(e.get("id")), str(e.get("direction")), str(e.get("nick")))
        if row is None:
            return
        done, total = int(e.get("done") or 0), int(e.get("size") or 0)
        row["bar"]["value"] = 100 * done / total if total else 100
        eta = e.get("eta")
        left = "" if not isinstance(eta, (int, float)) or done >= total else \
            " · under 1 s left" if eta < 1 else f" · {eta:.0f} s left"
        row["label"].configure(text=f"{self.files[str(e['id'])]['name']}: "
                                    f"{format_size(done)} of {format_size(total)} · "
                                    f"{format_size(e.get('speed') or 0)}/s{left}")

    def _finish_row(self, tid: str, key: str, text: str, colour: str) -> dict | None:
        info = self.files.get(tid)
        row = (info or {}).get("rows", {}).get(key)
        if row is not None:
            row["label"].configure(text=text, fg=THEME[colour])
            row["cancel"].destroy()
            row["bar"].configure(style=("Done" if colour == "ok" else "Failed")
                                 + ".Horizontal.TProgressbar")
        return info

    def on_file_received(self, e: dict) -> None:
        tid, path = str(e.get("id")), Path(str(e.get("path")))
        info = self._finish_row(tid, "in", f"{path.name}: saved, size and SHA-256 checked",
                                "ok")
        if info is None:
            return
        row = info["rows"]["in"]
        row["bar"]["value"] = 100
        convo = info["convo"]
        def open_folder() -> None:
            problem = self.open_folder(path.parent)
            if problem:
                self.add_system(f"Cannot open {path.parent}: {problem}", "error", convo=convo)
        opener = self._button(convo, "Open folder", open_folder)
        self._embed(convo, [opener], f"Saved as {path}")
        if path.suffix.lower() in (".png", ".gif"):
            self._thumbnail(convo, path)

    def _thumbnail(self, convo: Conversation, path: Path) -> None:
        """PNG and GIF pictures are shown inline, at most THUMBNAIL pixels wide or high."""
        try:
            image = self.tk.PhotoImage(master=self.master, file=str(path))
        except self.tk.TclError as e:
            self.add_system(f"(no preview: {e})", convo=convo)
            return
        factor = max(1, -(-max(image.width(), image.height()) // THUMBNAIL))
        if factor > 1:
            image = image.subsample(factor)
        self.thumbnails.append(image)
        convo.run = None
        c = convo.text
        c.configure(state="normal")
        c.image_create("end", image=image, padx=60)
        c.insert("end", "\n")
        c.configure(state="disabled")
        if convo.pinned:
            c.see("end")

    def on_file_sent(self, e: dict) -> None:
        tid = str(e.get("id"))
        info = self._finish_row(tid, f"out:{nick_key(str(e.get('nick')))}",
                                f"{e.get('name')}: {e.get('nick')} has it, checked", "ok")
        if info is not None:
            info["rows"][f"out:{nick_key(str(e.get('nick')))}"]["bar"]["value"] = 100

    def on_file_failed(self, e: dict) -> None:
        tid = str(e.get("id"))
        key = "in" if e.get("direction") == "in" else f"out:{nick_key(str(e.get('nick')))}"
        text = f"{e.get('name')}: {e.get('reason')}"
        info = self.files.get(tid)
        if self._finish_row(tid, key, text, "error") is None or \
                key not in self.files.get(tid, {}).get("rows", {}):
            if info is not None and "status" in info:
                return  # the offer's own line says it (see _refresh_transfers)
            self.add_system(text, "error", convo=info["convo"] if info else None)

    def on_file_decline(self, e: dict) -> None:
        info = self.files.get(str(e.get("id")))
        if info is not None:
            self.add_system(f"{e.get('nick')} declined {info['name']}.", convo=info["convo"])

    def on_file_cancel(self, e: dict) -> None:
        tid = str(e.get("id"))
        info = self.files.get(tid)
        if info is None:
            return
        for w in info.pop("answer", []):
            w.destroy()
        if not info.get("rows"):
            self.add_system(f"{info['name']}: {e.get('reason')}", convo=info["convo"])

    def on_failed(self, e: dict) -> None:
        self.add_system(f"Not sent ({e.get('message')}): {str(e.get('text', ''))[:80]}", "error")

    def on_error(self, e: dict) -> None:
        self.add_system(str(e.get("message") or e.get("code")), "error")

    def on_bye(self, e: dict) -> None:
        self.add_system(f"Server says bye: {e.get('reason')}", "error")

    def on_fatal(self, e: dict) -> None:
        self.set_status(str(e.get("message")), THEME["error"])
        self.add_system(str(e.get("message")), "error")

    def on_nick_rejected(self, e: dict) -> None:
        # Only possible when reconnecting with a nick someone else took meanwhile.
        new = (self.nick + "_")[:MAX_NICK_LEN]
        self.add_system(f"{e.get('message')} Trying {new}.", "error")
        self.net.set_nick(new)

    # --- sidebar, title, status, typing
    def _refresh_users(self) -> None:
        if self.convo.is_room:
            names = self.state.members(self.convo.name)
        else:
            names = sorted({self.nick, self.convo.name}, key=nick_key)
        self.listed = names
        self.user_list.delete(0, "end")
        for i, name in enumerate(names):
            me = nick_key(name) == nick_key(self.nick)
            away = self.state.away_message(name) is not None
            gone = not self.convo.is_room and not self.state.here(name)
            via = self.state.server_of(name)
            label = f"● {name}" + ("  (you)" if me else "") + ("  (away)" if away else "") + \
                ("  (left)" if gone else "") + (f"  · {via}" if via else "")
            self.user_list.insert("end", tk_safe(label))
            # Away users are dimmed, like a grey presence dot in Slack; everyone
            # while the server is away.
            self.user_list.itemconfigure(i, foreground=THEME["dim"] if away or gone or self.offline
                                         else nick_hex(name))
        where = "ONLINE" if self.convo.is_room else "PRIVATE"
        self.count_label.configure(text=f"{where} — {len(names)}")

    def user_names(self) -> list[str]:
        """What the sidebar lists, without decoration (for tests and completion)."""
        return list(self.listed)

    def _update_title(self) -> None:
        prefix = f"({self.unread}) " if self.unread and not self.focused else ""
        self.master.title(tk_safe(f"{prefix}PyChat — {self.room} — {self.nick}"))

    def set_status(self, text: str, colour: str) -> None:
        self.status_label.configure(text=tk_safe(text))
        self.status_dot.configure(fg=colour)

    def _show_typing(self) -> None:
        names = sorted(self.typing_since, key=nick_key)
        if not names:
            text = ""
        elif len(names) == 1:
            text = f"{names[0]} is typing..."
        elif len(names) <= 3:
            text = f"{', '.join(names[:-1])} and {names[-1]} are typing..."
        else:
            text = "Several people are typing..."
        self.typing_label.configure(text=tk_safe(text))

    def _expire_typing(self) -> None:
        now = time.monotonic()
        stale = [n for n, t in self.typing_since.items() if now - t > TYPING_SHOWN_FOR]
        for n in stale:
            del self.typing_since[n]
        if stale or (not self.typing_since and self.typing_label.cget("text")):
            self._show_typing()

    def _place_marker(self, convo: Conversation) -> None:
        if convo.marker_pending:
            convo.marker_pending = False
            self.add_marker(convo)

    def _focus_in(self, event: Any) -> None:
        if not self.focused:
            self.focused = True
            self.unread = 0
            self.convo.unread = 0
            self._refresh_convos()
            self._update_title()

    def _focus_out(self, event: Any) -> None:
        # FocusOut also fires when focus moves between our own widgets.
        if not self.closing:
            if self._focus_after is not None:
                self.master.after_cancel(self._focus_after)
            self._focus_after = self.master.after(10, self._check_focus)

    def _check_focus(self) -> None:
        self._focus_after = None
        if self.closing:
            return
        try:
            inside = self.master.focus_get() is not None
        except (KeyError, self.tk.TclError):  # focus is in a popup Tk can't name
            inside = True
        if not inside and self.focused:
            self.focused = False

    def toggle_mute(self) -> None:
        self.notifier.muted = not self.notifier.muted
        self.mute_button.widget.configure(text="Muted" if self.notifier.muted else "Sound on")

    # --- input
    def _move_cursor(self, index: str) -> str:
        self.input.mark_set("insert", index)
        self.input.see("insert")
        return "break"

    def _on_return(self, event: Any) -> str:
        self.send_input()
        return "break"

    def _on_shift_return(self, event: Any) -> str:
        self.input.insert("insert", "\n")
        return "break"

    def _on_up(self, event: Any) -> str | None:
        # Recall only from the first line, so Up still moves within a draft.
        if self.input.compare("insert linestart", "!=", "1.0") or not self.sent:
            return None
        if self.sent_pos == len(self.sent):
            self.draft = self.input.get("1.0", "end-1c")  # Down brings it back
        self.sent_pos = max(0, self.sent_pos - 1)
        self._set_input(self.sent[self.sent_pos])
        return "break"

    def _on_down(self, event: Any) -> str | None:
        if self.input.compare("insert lineend", "!=", "end-1c") or not self.sent:
            return None
        self.sent_pos = min(len(self.sent), self.sent_pos + 1)
        self._set_input(self.sent[self.sent_pos] if self.sent_pos < len(self.sent)
                        else self.draft)
        return "break"

    def _set_input(self, text: str) -> None:
        self.input.delete("1.0", "end")
        self.input.insert("1.0", text)
        self.input.mark_set("insert", "end-1c")

    def _on_tab(self, event: Any) -> str:
        """Complete the nick before the cursor: "bob: " at the start, "bob " elsewhere."""
        before = self.input.get("insert linestart", "insert")
        word = re.split(r"\s", before)[-1]
        if word:
            matches = complete_nick(word, [u for u in self.user_names()
                                           if nick_key(u) != nick_key(self.nick)])
            if matches:
                at_start = self.input.compare(f"insert-{len(word)}c", "==", "1.0")
                self.input.delete(f"insert-{len(word)}c", "insert")
                self.input.insert("insert", matches[0] + (": " if at_start else " "))
        return "break"  # Tab never moves focus out of the input

    def _on_key_release(self, event: Any) -> None:
        if event.keysym in ("Return", "KP_Enter", "Tab", "Up", "Down", "Shift_L", "Shift_R"):
            return
        if typing_counts(self.input.get("1.0", "end-1c")):
            self.net.typing()

    def _on_input_modified(self, event: Any) -> None:
        """Every change to the draft (typing, pasting, recalling): fit the box."""
        if self.input.edit_modified():
            self.input.edit_modified(False)  # so the next change fires again
            self._fit_input()

    def _fit_input(self) -> None:
        """Grow the box with its text, from INPUT_MIN_LINES up to INPUT_MAX_LINES
        (then it scrolls); past that, a label says how long the draft is.  Emoji
        runs are drawn in the colour font."""
        if self.closing:
            return
        box = self.input
        text = box.get("1.0", "end-1c")
        if self.colour_emoji:
            box.tag_remove("emoji", "1.0", "end")
            for start, end in emoji_runs(text):
                box.tag_add("emoji", f"1.0+{start}c", f"1.0+{end}c")
        box.update_idletasks()
        shown = box.count("1.0", "end-1c", "update", "displaylines")
        shown = (shown[0] if isinstance(shown, tuple) else shown or 0) + 1
        height = max(INPUT_MIN_LINES, min(INPUT_MAX_LINES, shown))
        if int(box.cget("height")) != height:
            box.configure(height=height)
        lines = text.count("\n") + 1
        if max(lines, shown) > INPUT_MAX_LINES:
            self.lines_label.configure(text=f"{lines} lines" if lines > 1 else "1 long line")
            self.lines_label.grid()
        else:
            self.lines_label.grid_remove()
        if height < shown:
            box.see("insert")

    def insert_emoji(self, char: str) -> None:
        """Put a picked emoji at the cursor, remember it, close the picker."""
        self.input.insert("insert", char)
        self.recent_emoji = ([char] + [c for c in self.recent_emoji if c != char])[:EMOJI_RECENT]
        self.save_recent(self.recent_emoji)
        self.close_emoji()
        self.input.focus_set()

    def close_emoji(self) -> None:
        if self.emoji_panel is not None:
            self.emoji_panel.destroy()
            self.emoji_panel = None

    def _click_outside_emoji(self, event: Any) -> None:
        panel = self.emoji_panel
        if panel is None:
            return
        widget = event.widget if not isinstance(event.widget, str) else None
        inside = str(widget).startswith(str(panel)) if widget is not None else True
        if not inside and widget is not self.emoji_button.widget:
            self.close_emoji()  # the click itself goes on to what was clicked

    def toggle_emoji(self) -> None:
        """Open (or close) the emoji picker: a small popover above its button,
        with a search field, a tab per group and a tab of recently used ones."""
        tk = self.tk
        if self.emoji_panel is not None:
            self.close_emoji()
            return
        side = THEME["side"]
        panel = tk.Frame(self.master, bg=side, padx=8, pady=8, highlightthickness=1,
                         highlightbackground=THEME["button"])
        self.emoji_panel = panel
        check = (self.master.register(bmp_only), "%P")
        self.emoji_query = tk.StringVar(master=panel)
        search = tk.Entry(panel, textvariable=self.emoji_query, bg=THEME["input"],
                          fg=THEME["text"], insertbackground=THEME["text"], relief="flat",
                          highlightthickness=1, highlightbackground=THEME["input"],
                          highlightcolor=THEME["accent"], validate="key",
                          validatecommand=check, font=self.fonts["small"])
        search.grid(row=0, column=0, sticky="ew", ipady=3)
        self.emoji_search_entry = search
        tabs = tk.Frame(panel, bg=side)
        tabs.grid(row=1, column=0, sticky="w", pady=(6, 4))
        self.emoji_tabs: dict[str, Any] = {}
        for name in ["Recent"] + list(self.emoji):
            b = tk.Button(tabs, text=name, relief="flat", bd=0, padx=5, pady=2,
                          highlightthickness=0, font=self.fonts["small"], cursor="hand2",
                          command=lambda n=name: self._emoji_tab(n))
            b.pack(side="left", padx=(0, 2))
            self.emoji_tabs[name] = b
        self.emoji_grid = tk.Frame(panel, bg=side)
        self.emoji_grid.grid(row=2, column=0, sticky="nw")
        self.emoji_query.trace_add("write", lambda *a: self._fill_emoji())
        for w in (panel, search):
            w.bind("<Escape>", lambda e: (self.close_emoji(), self.input.focus_set(), "break")[2])
        search.bind("<Return>", lambda e: self._pick_first_emoji())
        self._emoji_tab(self.emoji_tab if self.emoji_tab in self.emoji_tabs else "Recent")
        self._place_emoji()
        search.focus_set()

    def _emoji_tab(self, name: str) -> None:
        self.emoji_tab = name
        if self.emoji_query.get():
            self.emoji_query.set("")  # its trace refills the grid
        else:
            self._fill_emoji()

    def _emoji_shown(self) -> list[str]:
        query = self.emoji_query.get().strip()
        if query:
            return emoji_search(query, self.emoji)
        if self.emoji_tab == "Recent":
            return list(self.recent_emoji)
        return list(self.emoji.get(self.emoji_tab, []))

    def _fill_emoji(self) -> None:
        """The grid for the tab on show, or the search results."""
        tk = self.tk
        if self.emoji_panel is None:
            return
        searching = bool(self.emoji_query.get().strip())
        for name, b in self.emoji_tabs.items():
            on = name == self.emoji_tab and not searching
            b.configure(bg=THEME["accent"] if on else THEME["side"],
                        fg="#ffffff" if on else THEME["dim"],
                        activebackground=THEME["button_hover"], activeforeground="#ffffff")
        for w in self.emoji_grid.winfo_children():
            w.destroy()
        chars = self._emoji_shown()
        font = (self.emoji_font or self.font[0], 14)
        # Every cell is one square, as big as the font's line: a fixed size for
        # every tab, so the popover never jumps around.
        import tkinter.font as tkfont
        # (A colour emoji font's own metrics are those of its huge bitmaps.)
        size = tkfont.Font(self.master, font=(self.font[0], 14)).metrics("linespace") + 10
        rows = max(2, -(-max(len(v) for v in [*self.emoji.values(), [""]]) // EMOJI_COLUMNS))
        for i in range(EMOJI_COLUMNS):
            self.emoji_grid.columnconfigure(i, minsize=size, uniform="cell")
        for i in range(rows):
            self.emoji_grid.rowconfigure(i, minsize=size, uniform="cell")
        self.emoji_grid.configure(width=EMOJI_COLUMNS * size, height=rows * size)
        self.emoji_grid.grid_propagate(False)
        for i, ch in enumerate(chars):
            b = tk.Button(self.emoji_grid, text=ch, font=font, relief="flat", bd=0, padx=0,
                          pady=0, highlightthickness=0, bg=THEME["side"], fg=THEME["text"],
                          activebackground=THEME["button_hover"], cursor="hand2",
                          command=lambda c=ch: self.insert_emoji(c))
            b.bind("<Enter>", lambda e, w=b: w.configure(bg=THEME["button_hover"]))
            b.bind("<Leave>", lambda e, w=b: w.configure(bg=THEME["side"]))
            b.grid(row=i // EMOJI_COLUMNS, column=i % EMOJI_COLUMNS, sticky="nsew")
        if not chars:
            empty = ("No emoji by that name." if searching else
                     "Emoji you pick show up here.")
            tk.Label(self.emoji_grid, text=empty, bg=THEME["side"], fg=THEME["dim"],
                     font=self.fonts["small"]).grid(row=0, column=0, columnspan=EMOJI_COLUMNS,
                                                    sticky="w")
        self._place_emoji()

    def _place_emoji(self) -> None:
        """Above the emoji button, right-aligned with it, inside the window."""
        panel = self.emoji_panel
        if panel is None:
            return
        panel.update_idletasks()
        button = self.emoji_button.widget
        x = button.winfo_rootx() - self.master.winfo_rootx() + button.winfo_width() \
            - panel.winfo_reqwidth()
        y = button.winfo_rooty() - self.master.winfo_rooty() - panel.winfo_reqheight() - 6
        panel.place(x=max(0, x), y=max(0, y))
        panel.lift()

    def _pick_first_emoji(self) -> str:
        shown = self._emoji_shown()
        if shown:
            self.insert_emoji(shown[0])
        return "break"

    def send_input(self) -> None:
        text = self.input.get("1.0", "end-1c")
        if not text.strip():
            return
        self.sent.append(text)
        self.sent = self.sent[-200:]
        self.sent_pos = len(self.sent)
        if self.run_command(text) and not self.closing:  # /quit closed the window
            self.input.delete("1.0", "end")

    def where(self) -> Where:
        """The window's side of what plan_command needs."""
        private = None if self.convo.is_room else self.convo.name
        room = self.convo.name if self.convo.is_room else LOBBY
        return self.state.where("gui", room, private,
                                int(self.net.client.limits.get("max_text", MAX_TEXT)))

    def run_command(self, text: str) -> bool:
        """Do what a typed line asks; False (the draft stays) when it was refused."""
        plan = plan_command(text, self.where())
        if plan.note:
            self.add_system(plan.note, "error")
        getattr(self, f"do_{plan.do}")(**plan.args)
        return plan.do != "error"

    # --- what typed lines do (see plan_command)
    def do_nothing(self) -> None:
        pass

    def do_error(self, text: str, lost: bool = False) -> None:
        self.add_system(text, "error")  # the draft stays in the box: nothing is lost

    def do_show(self, text: str) -> None:
        self.add_system(text)

    def do_say(self, text: str, action: bool, to: str | None, room: str,
               open: bool = False) -> None:
        if to is None:
            self.net.send_msg(text, action, room)
            return
        if open:  # /msg bob text: the conversation comes to the front
            self.show_convo(self._convo(to).key)
        self.net.send_pm(to, text, action)

    def do_query(self, nick: str) -> None:
        self.show_convo(self._convo(nick).key)

    def do_nick(self, nick: str) -> None:
        self.net.change_nick(nick)

    def do_who(self, room: str) -> None:
        names = [name + (f" (on {via})" if (via := self.state.server_of(name)) else "")
                 for name in self.user_names()]
        self.add_system(f"{len(names)} in {self.room}: {', '.join(names)}")

    def do_join(self, room: str) -> None:
        if convo_key(room) not in self.convos:
            self.net.request("join", room=room)
            self.add_system(f"You joined {room}", convo=self._convo(room))
        self.show_convo(self._convo(room).key)

    def do_switch(self, room: str) -> None:
        if convo_key(room) not in self.convos:
            self._convo(room)
        self.show_convo(convo_key(room))

    def do_close(self) -> None:
        self.close_convo(self.current)

    def do_request(self, kind: str, fields: dict) -> None:
        self.net.request(kind, **fields)

    def do_help(self, rows: list[tuple[str, str]]) -> None:
        self.add_help(rows)

    def do_quit(self, reason: str) -> None:
        self.close(reason)

    def do_send_file(self, path: str, to: str | None) -> None:
        self.offer_file(path, to)

    def do_pick_file(self) -> None:
        self.choose_file()

    def do_accept(self, tid: str) -> None:
        self.accept_file(tid)

    def do_decline(self, tid: str) -> None:
        self.decline_file(tid)

    def do_cancel(self, tid: str) -> None:
        self.cancel_file(tid)

    def do_files(self) -> None:
        self.list_files()

    def do_ignores(self) -> None:
        self.add_system("Ignoring: " + (", ".join(sorted(self.net.client.ignored)) or "nobody"))

    def do_ignore(self, nick: str, on: bool) -> None:
        keys = set(self.net.client.ignored)  # the client's, as it will be
        (keys.add if on else keys.discard)(nick_key(nick))
        self.net.ignore(nick, on)
        self.save_ignored(keys)
        self.add_system(f"{'Ignoring' if on else 'No longer ignoring'} {nick}.")

    # --- closing
    def close(self, reason: str = "") -> None:
        """Stop polling, quit the network thread (bounded), destroy the window."""
        if self.closing:
            return
        self.closing = True
        if self._after is not None:
            self.master.after_cancel(self._after)
            self._after = None
        for pending in (self._focus_after, self._darken_after):
            if pending is not None:
                self.master.after_cancel(pending)
        self.net.close(1.0, reason)
        try:
            self.master.update_idletasks()  # let pending Tk callbacks run before we go
        except self.tk.TclError:
            pass
        self.master.destroy()


def _open_folder(folder: Path) -> str | None:
    """Show a folder in the system's file manager; what went wrong, if anything."""
    try:
        if sys.platform == "win32":
            os.startfile(folder)  # type: ignore[attr-defined]  # Windows only
        else:
            opener = "open" if sys.platform == "darwin" else "xdg-open"
            if shutil.which(opener) is None:
                return f"there is no {opener} on this system to open folders with"
            subprocess.Popen([opener, str(folder)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    except OSError as e:
        return str(e.strerror or e)
    return None


def _open_in_browser(url: str) -> None:
    """Open a link without blocking the window (some browsers run until closed)."""
    def run() -> None:
        import webbrowser
        try:
            webbrowser.open(url, new=2)
        except Exception as e:  # a browser problem is not a chat problem
            log.warning("could not open %s: %s", url, e)
    threading.Thread(target=run, name="pychat-browser", daemon=True).start()


class GuiApp:
    """The GUI's flow: the connect dialog until a welcome, then the chat window."""

    def __init__(self, root: Any, args: argparse.Namespace, settings_path: Path | None = None):
        self.root = root
        self.args = args
        self.settings_path = settings_path or config_dir() / "settings.json"
        self.settings = load_settings(self.settings_path)
        self.net: ClientThread | None = None
        self.window: ChatWindow | None = None
        self.dialog: ConnectDialog | None = None
        self.notifier = Notifier()
        self.ssl_context = getattr(args, "ssl_context", None)
        self._early: list[dict] = []
        self._after: str | None = None
        root.title("PyChat")
        root.configure(bg=THEME["bg"])
        host = args.host or self.settings.get("host") or "localhost"
        port = args.port or self.settings.get("port") or DEFAULT_PORT
        nick = args.nick or self.settings.get("nick") or default_nick()
        root.protocol("WM_DELETE_WINDOW", self.quit)
        if args.host and args.port and args.nick:
            self.connect(host, int(port), nick)
        else:
            self.show_dialog(host, int(port), nick)

    def show_dialog(self, host: str, port: int, nick: str, error_text: str = "") -> None:
        look = self.args.host is None and find_at_from_env() != []
        self.dialog = ConnectDialog(self.root, host, port, nick, self.connect,
                                    scan=self._scan if look else None)
        if error_text:
            self.dialog.show_error(error_text)

    def _scan(self) -> None:
        """Look for servers in a thread (find_servers blocks for seconds); the
        dialog gets the result on Tk's thread."""
        box: list[Any] = []
        at = find_at_from_env()

        def search() -> None:
            try:
                box.append(find_servers(at=at))
            except Exception as e:  # whatever happens, the dialog must hear of it
                box.append(FindResult([], [], [f"the search failed: {e}"], FIND_SECONDS))
        threading.Thread(target=search, daemon=True).start()

        def check() -> None:
            if not box:
                self.root.after(POLL_MS, check)
            elif self.dialog is not None:
                self.dialog.show_found(box[0])
        self.root.after(POLL_MS, check)

    def connect(self, host: str, port: int, nick: str) -> None:
        self.target = (host, port, nick)
        self._early = []
        password = (self.dialog.value("password") if self.dialog is not None else "") or \
            os.environ.get("PYCHAT_PASSWORD") or None
        ssl_context = self.ssl_context
        found = self.dialog.chosen() if self.dialog is not None else None
        if found is not None and found.tls and ssl_context is None:
            try:
                ssl_context = trust_found(found, self.settings, self._ask_trust)
            except PyChatError as e:
                return self._failed(str(e))
            save_settings(self.settings_path, self.settings)
        self.net = ClientThread(host, port, nick, client=f"pychat-gui/{__version__}",
                                connect_attempts=1, password=password,
                                ssl_context=ssl_context, ignored=self._ignored()).start()
        self._after = self.root.after(POLL_MS, self._wait_welcome)

    def _ask_trust(self, question: str) -> bool:
        from tkinter import messagebox
        return bool(messagebox.askyesno("Trust this server?", question, parent=self.root))

    def _wait_welcome(self) -> None:
        """Poll the new connection until it is welcomed, refused or gives up."""
        self._after = None
        assert self.net is not None
        while True:
            try:
                event = self.net.events.get_nowait()
            except queue.Empty:
                break
            kind = event.get("type")
            if kind == "welcome":
                self._early.append(event)
                return self._open_window(str(event.get("nick")))
            if kind in ("nick_rejected", "fatal", "password_needed"):
                self._failed(str(event.get("message")))
                if kind == "password_needed" and self.dialog is not None:
                    self.dialog.focus("password")
                return
            self._early.append(event)
        self._after = self.root.after(POLL_MS, self._wait_welcome)

    def _failed(self, message: str) -> None:
        if self.net is not None:
            threading.Thread(target=self.net.close, daemon=True).start()  # don't block Tk
            self.net = None
        host, port, nick = self.target
        if self.dialog is None:
            self.show_dialog(host, port, nick, message)
        else:
            self.dialog.set_busy(False)
            self.dialog.show_error(message)

    def _open_window(self, nick: str) -> None:
        host, port, _ = self.target
        self.settings.update(host=host, port=port, nick=nick)
        save_settings(self.settings_path, self.settings)
        if self.dialog is not None:
            self.dialog.destroy()
            self.dialog = None
        assert self.net is not None
        self.window = ChatWindow(self.root, self.net, host=host, port=port,
                                 notifier=self.notifier,
                                 save_ignored=self._save_ignored,
                                 recent_emoji=list(self.settings.get("recent_emoji") or []),
                                 save_recent=self._save_recent)
        folder = getattr(self.args, "download_dir", None)
        self.window.download_dir = Path(folder).expanduser() if folder else None
        self.root.geometry("900x600")
        for event in self._early:  # what arrived before the window existed
            self.window.handle_event(event)
        self._early = []

    def _ignored(self) -> set[str]:
        return {nick_key(str(n)) for n in self.settings.get("ignore", []) if isinstance(n, str)}

    def _save_ignored(self, keys: set[str]) -> None:
        self.settings["ignore"] = sorted(keys)
        save_settings(self.settings_path, self.settings)

    def _save_recent(self, chars: list[str]) -> None:
        self.settings["recent_emoji"] = chars
        save_settings(self.settings_path, self.settings)

    def quit(self) -> None:
        if self._after is not None:
            self.root.after_cancel(self._after)
        if self.window is not None:
            self.window.close()
            return
        if self.net is not None:
            self.net.close(1.0)
        self.root.destroy()


def run_gui(args: argparse.Namespace) -> int:
    """Open the desktop client; returns the exit status."""
    try:
        import tkinter as tk
    except ImportError:
        print("pychat: this Python has no tkinter; use `python pychat.py cli` instead "
              "(or install your system's python3-tk package).", file=sys.stderr)
        return 1
    try:
        root = tk.Tk(className="PyChat")
    except tk.TclError as e:
        print(f"pychat: cannot open a window ({e}); use `python pychat.py cli` in a "
              "terminal instead.", file=sys.stderr)
        return 1
    try:
        # 128 and 64 px: X servers refuse a 256 px window icon (too big a request)
        icon = tk.PhotoImage(master=root, data=ICON_PNG_B64)
        root.iconphoto(True, icon.subsample(2), icon.subsample(4))
    except tk.TclError:  # a Tk without PNG support (before 8.6): the default icon
        pass
    GuiApp(root, args)

    def heartbeat() -> None:  # lets Python see Ctrl-C while Tk waits for events
        root.after(250, heartbeat)
    root.after(250, heartbeat)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        pass
    return 0


# ===========================================================================
# 7b. Desktop launcher -- `install-desktop` / `uninstall-desktop`: a menu
#     entry with an icon that starts `pychat.py gui`, for the current user
#     only (freedesktop .desktop on Linux, PyChat.app on macOS, a Start-menu
#     entry on Windows).  Uses: constants, client core (config_dir).
# ===========================================================================

# The application icon, drawn for PyChat (a 256x256 PNG: a speech bubble).
ICON_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAQAAAAEACAYAAABccqhmAAAKN0lEQVR42u3dvYpkRRiH8b2EvoS5"
    "hL6EvYQON2wEQ3EzDYeNFyYSw8bMYGFgAyOhTYwMJhLMRgxFGFBX18+xS3pwdl1mu+dU1amq9/eH"
    "BwQ/9nhO1dNvfZw6Dx69++MDADFxEwACAEAAAAgAAAEAIAAABACAADpiuWO143THZsd2z9WOa+AN"
    "XN1qJ5t921nt2xIBNMxix3rH2Y4LDRmFuNi3sfW+zRHAzL/wOjxaEMKSAOpwsi/LLjU+NMblvm2e"
    "EEB+Hu4418jQCef7NksAE1n7tUfnVcGaAHR8EMGaAA4r9bcaDAZl29rQoKVlvDMNBEE4a2UZsYXO"
    "v7I5B0E3Ha0iC8CvPjBzNTDnJh4beID/NhQtowhAyQ80MiSo3fkfe9DAnTweVQAbDxc4iM1oAtD5"
    "gQYloPMDgSWg8wOBJaDzA4ElYLYfCLw6UGqd3wMD8rNqXQBLm3yAopuFlq0KYGF7L1Bl2/CiRQF4"
    "sQeo9wJRUwIw7gc6nA/IVfob9wP15wMWLQhA6Q90OhTIcYafBwHMx8M5BbD1AIBZ2c4lgLWbDzTB"
    "eg4BXLrxQBNc1haAX39ggCrArz8QuAow8w8EXhG4jwB8pRdok/PSAjhxk4GmOSkpgFM3GGia05IC"
    "MPkHDDQZeOxhH24w0D7LEgLw0g8w2EtCxwjAaT9AP6cGZRXAwk0FumKRUwC2/gIDbg02/gcCzwMY"
    "/wOB5wEOFYAbCvRHFgFY/wcG3Q/gyG9gXFY5BGD/PzDoewE+8w2MyyaHALZuJNAlWwIACGCSAHz2"
    "C+iTqxwCcCOBQfcCEABAAAQAEAABHM2Tpy+uP/n05fVnn/92/fU3f/6LlMnN/U33Ot3zdO+1QQKo"
    "ynsf/vxv4/vq4g89spGkZ5GeSXo22igBFOHjza9+3TupEtKz0mYJYDLvvP/T9bPnL69fvPhbz+os"
    "6ZmlZ5eeIQEQwNHo+GOJgAAI4OBJve9/+EvPGSzpmQadNCSAQ8v9NLssYyc942DDAgJ4Gx88+fn6"
    "2+/86kdJetbpmRMAAVw//egXY/2gcwPp2RNAYAGk5SKJnQBLhgSg80tgCRCAzi+BJUAAr4/5Rd6U"
    "QecECOD2bL8JP7lrYnDA1QECuFnnt9QnhywRDrZPgAASNvnIoUlthQAGEkDaAipyTAbaNkwA9vbL"
    "sUlthgAGEEB6E0zkPhnkLcK4AkiTOWb9ZcqqwAATgnEF4NdfVAGBBeDXX3JUAQRgu68ETufbhGMK"
    "wAGekiupLRFAZ0d3i+RMx0eOxxNAOiNeJGdSmyKATvDRDsmd1KYIoBNESoQA7PuXwOn0/YBYAjD+"
    "F/MAgQXgtV8plU5fE44lAOv/Uiqd7gcgABECCCIAESsBBCBCAAQgQgAEIEIABDBX0lHTaQIpLSMl"
    "0l/PeUS56yEAAiictHc8fWnmriOl0t9L/0yNdxdcDwEQQKWlovu8Opr+nRJLmK6HAAigQtLRUTlO"
    "jkn/jRxHmbkeAiCAip0/5zflpn7D0PUQAAF02vmnNnLXQwAEUDElD4y8z8GmrocACKDihF9L7za4"
    "HgIggIqpcVDkMQecuh4CIICK6/wtnXHoegiAACoKIG1QqfX/lP4s1zPtegiAALKm5kcj05/leqZd"
    "DwEQQNa967X/v+7aG+96fqz27gABEMAsJ8PcNdvteuqtBhAAAcxyOORdh526nnqHwRIAAehwBEAA"
    "hgBKbkMAAjAJaNLNJCABWAa07GYZkABsBLLxxkYgArAV2NZbW4EJwMtAXgbyMhABeB3Y68BeByYA"
    "B4I4EMSBIATgSDBHgjkSjAAcCupQUIeCEoBjwR0L7lhwAvBhEB8G8WEQAhhBALfXwX2Kq5/rIQAC"
    "KPrugI9x9nM9BEAAIgRAACIEQAAiBEAAIgTQOC0sFcmYmeOkIwIgACEAAmjtcEiJlzkOOyWAI/nk"
    "05daqhRJalsE0DhPnr7QUqVIUtsiACsBYgWAAFqmpb3jMkZqnnFIAOYBxPifAHo5KFLGT40DTgnA"
    "fgBpMJ2u/8cWwBwHRsqYKXmwKQEUZM6jo2SMpDbUcx8ILYBnz00GyrSkNkQAnZKOlFIFyJRf/5of"
    "OSUAVYD49SeA3Hz/w19asxyV1GZGaPsE4P0AuUc63fdPAF4Tlqnp9LVfAnjbhGCrR01LO0ltZICJ"
    "PwJo7Zty0sesf4kPmRJAQ6QvzYi8KaltjNbeCcA2YTkgnW/3JQASEJ2fAEhAdH4COG5OwMRgzAm/"
    "Qcf8BHCf1QFLhLGW+gac7SeAqfsEbBYaP+kZD7bOTwC5tw17d2C8pGc60PZeAqjxFqG5gTHG+oO8"
    "1UcAcwwLiKDvjh+s3CeAkkuGDhptP+kZBVjaI4A5jxw3WdhW0kc70rn9HR/dTQBeLZZDft0T6f6n"
    "Dh90Uo8AnDD0apS8IICKm4ZamugKtKEFBKD8v72bzQw3CCBg+f/Fl797FiCAiOW/8T4IIGD5b7wP"
    "Agha/hvvgwCClv/G+yCAoOW/8T4IIGD5b7wPAgha/hvvgwCClv/G+yCAoOW/8T4IIGD5b7wPAgha"
    "/hvvgwCClv/G+yCAoOW/8T4IIGD5b7wPAgha/hvvgwCClv/G+yCAoOW/8T4IIGD5b7wPAgha/hvv"
    "gwCClv/G+yCAoOW/8T4IIGD5b7wPAgha/hvvY3QBXCn/jffRJVc5BLBV/hvvo0u2BJC5/DfeRzQB"
    "bJT/xvvokk0OAZwq/4330SWnOQSwil7+G++jU1Y5BLCMWv4b76NzljkE8CBi+W+8j9H3ABwjgItI"
    "5b/xPgbgIqcAzqKU/8b7GISznAJYj17+G+9jMNY5BbAYufw33seALHIKYNh5gGfPX2osCDn+P1YA"
    "Z24sMM74/1gBLN1YYIz1//sIIHHp5gJNc3lMnz5WAKduMND3/v8pAjhxg4GmOSkpgMS5mww0yfmx"
    "/fk+AnjoRgNN8rCGAEwGAp1P/k0VwNoNB/rb+ptLAKoAoPNf/6kCUAUAHf/6TxVAqBODgUbZTunD"
    "UwVgRQDobOY/pwC8JAR08NJPSQGk946vPAygKleHvvNfWgBhjg4HGmKVo+/mEoChANBR6V9CAKkc"
    "ufBwgOKn/SxaFMDNoSHmA4By4/5lzj6bWwDmA4DGx/2lBZB47GEBWXlcoq+WEkCoz4oDhdmU6qcl"
    "BUACQMOdv4YASABotPPXEgAJAA12/poCIAGgsc5fWwBWB4CZZvtbEcDNPgGbhYD/b/JZ1e6Pcwjg"
    "ZsegbcPAf9t7l3P0xbkEcPPugBeI4MWejHv7exKAIQGU/DP3vxYEoBqAX/3gArh9xuBWA8GgbB9N"
    "PMNvdAHcPnL8UoPBIFw+mnB0d0QBEAF0fAJ4ZWjgq8TohfPWSv3eBXBD+vb5qaoAjf7an+7baDd9"
    "qjcBvL6Z6MyGIsy8gedsrk080QXw+jLimhBQqcOvW1nGI4C7K4TVvizb7JdgtjYd4S2bc27ayWbf"
    "dlY9/8JHFgAAAgBAAAAIAAABACAAgAAAEACAaPwDL7iGF61OZR8AAAAASUVORK5CYII="
)

# Every text file install-desktop writes carries this line, so uninstall (and
# a second install) can tell PyChat's files from somebody else's.
LAUNCHER_MARK = "written by pychat.py install-desktop"


def icon_png() -> bytes:
    return base64.b64decode(ICON_PNG_B64)


WEB_FILES["/icon.png"] = ("image/png", icon_png)  # the web page's icon (section 3c)


def icon_ico(png: bytes) -> bytes:
    """A Windows .ico holding the 256x256 PNG (Windows Vista and later read PNG
    icons; a size byte of 0 means 256)."""
    return struct.pack("<HHHBBBBHHII", 0, 1, 1, 0, 0, 0, 0, 1, 32, len(png), 22) + png


def icon_icns(png: bytes) -> bytes:
    """A macOS .icns holding the 256x256 PNG as its 'ic08' image."""
    entry = b"ic08" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def desktop_string(text: str) -> str:
    """A value in a .desktop file: backslash, newline, tab, CR escaped."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))


def desktop_exec(argv: list[str]) -> str:
    """A .desktop Exec value: each argument quoted as the freedesktop spec says
    (reserved characters in double quotes, with " ` $ \\ escaped, % doubled),
    then escaped as a string value, so a backslash ends up as four."""
    words = []
    for arg in argv:
        if arg and not any(c in arg for c in ' \t\n"\'\\><~|&;$*?#()`%='):
            words.append(arg)
        else:
            escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg)
            words.append('"' + escaped.replace("%", "%%") + '"')
    return desktop_string(" ".join(words))


def launcher_argv(script: Path, python: str, server: str | None = None,
                  nick: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The command a launcher runs: this interpreter, this file, `gui` and the
    defaults given to install-desktop (`extra`: TLS flags)."""
    argv = [python, str(script), "gui"]
    if server:
        host, _, port = server.rpartition(":")
        argv += ["--host", host.strip("[]"), "--port", port]
    if nick:
        argv += ["--nick", nick]
    return argv + list(extra)


def gui_python(system: str, python: str) -> str:
    """On Windows the interpreter to use is pythonw.exe (pythonw3.11.exe for
    python3.11.exe), next to python.exe: it starts without a console window.
    Where it is missing (checked on Windows only) python.exe it is."""
    if system == "win32":
        exe = PureWindowsPath(python)
        match = re.fullmatch(r"python([\d.]*)\.exe", exe.name, re.IGNORECASE)
        windowless = str(exe.with_name(f"pythonw{match[1]}.exe")) if match else python
        if sys.platform != "win32" or Path(windowless).exists():
            return windowless
    return python


def desktop_files(system: str, home: Path, env: Mapping[str, str], script: Path, python: str,
                  server: str | None = None, nick: str | None = None,
                  extra: tuple[str, ...] = ()) -> dict[Path, tuple[bytes, bool]]:
    """What install-desktop writes on `system` ("linux", "darwin", "win32"):
    {path: (contents, executable)}, the main launcher file first.  Pure: the
    tests generate every system's files on any system."""
    python = gui_python(system, python)
    argv = launcher_argv(script, python, server, nick, extra)
    gone = (f"PyChat cannot start: {python} or {script} is not there any more. Run "
            "`python pychat.py install-desktop` again with the pychat.py you want to use.")
    make = {"darwin": _mac_launcher, "win32": _windows_launcher}.get(system, _linux_launcher)
    return make(home, env, script, python, argv, gone, icon_png())


def _mac_launcher(home: Path, env: Mapping[str, str], script: Path, python: str,
                  argv: list[str], gone: str, png: bytes) -> dict[Path, tuple[bytes, bool]]:
    """A PyChat.app in ~/Applications whose executable is a shell script."""
    app = home / "Applications" / "PyChat.app" / "Contents"
    plist = plistlib.dumps({
        "CFBundleName": "PyChat", "CFBundleDisplayName": "PyChat",
        "CFBundleIdentifier": "org.pychat.PyChat", "CFBundleVersion": __version__,
        "CFBundleShortVersionString": __version__, "CFBundlePackageType": "APPL",
        "CFBundleInfoDictionaryVersion": "6.0", "CFBundleExecutable": "PyChat",
        "CFBundleIconFile": "PyChat.icns", "LSMinimumSystemVersion": "10.13",
        "NSHighResolutionCapable": True, "PyChatInstaller": LAUNCHER_MARK})
    alert = "display alert " + json.dumps(gone, ensure_ascii=False)  # AppleScript string
    launcher = (f"#!/bin/sh\n# Starts PyChat's window; {LAUNCHER_MARK}.\n"
                f"if [ ! -x {shlex.quote(python)} ] || [ ! -f {shlex.quote(str(script))} ]"
                f"; then\n    osascript -e {shlex.quote(alert)}\n    exit 1\nfi\n"
                "exec " + " ".join(shlex.quote(a) for a in argv) + "\n")
    return {app / "Info.plist": (plist, False),
            app / "MacOS" / "PyChat": (launcher.encode(), True),
            app / "Resources" / "PyChat.icns": (icon_icns(png), False)}


def _windows_launcher(home: Path, env: Mapping[str, str], script: Path, python: str,
                      argv: list[str], gone: str, png: bytes) -> dict[Path, tuple[bytes, bool]]:
    """A Start menu shortcut (.url) to a .pyw that starts the window."""
    appdata = env_folder(env, "APPDATA", home, "AppData/Roaming")
    folder = appdata / "PyChat" / "launcher"
    pyw = folder / "PyChat.pyw"
    ico = folder / "PyChat.ico"
    code = (f"# Starts PyChat's window; {LAUNCHER_MARK}.\n"
            "import os, subprocess\n"
            f"argv = {argv!r}\n"
            "try:\n"
            "    if not os.path.isfile(argv[1]):\n"
            "        raise OSError(argv[1])\n"
            "    subprocess.Popen(argv, close_fds=True)\n"
            "except OSError:\n"
            "    import ctypes\n"
            f"    ctypes.windll.user32.MessageBoxW(None, {gone!r}, 'PyChat', 0x10)\n")
    # Windows reads a .url in the ANSI code page; a path it cannot hold
    # goes (UTF-7 encoded, as Explorer writes it) in [InternetShortcut.W].
    lines = [f"; {LAUNCHER_MARK}", "[InternetShortcut]", f"URL={pyw.as_uri()}",
             "IconIndex=0"]
    if str(ico).isascii():
        lines.append(f"IconFile={ico}")
    else:
        lines += ["[InternetShortcut.W]", f"URL={pyw.as_uri()}",
                  "IconFile=" + str(ico).encode("utf-7").decode("ascii")]
    menu = appdata / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "PyChat.url"
    return {menu: ("\r\n".join(lines + [""]).encode("ascii"), False),
            pyw: (code.encode("utf-8"), False), ico: (icon_ico(png), False)}


def _linux_launcher(home: Path, env: Mapping[str, str], script: Path, python: str,
                    argv: list[str], gone: str, png: bytes) -> dict[Path, tuple[bytes, bool]]:
    """A freedesktop.org menu entry and its icon."""
    data = env_folder(env, "XDG_DATA_HOME", home, ".local/share")
    icon = data / "icons" / "hicolor" / "256x256" / "apps" / "pychat.png"
    entry = "\n".join([
        f"# {LAUNCHER_MARK}", "[Desktop Entry]", "Type=Application", "Version=1.0",
        "Name=PyChat", "GenericName=Chat", "Comment=A chat room in one Python file",
        "TryExec=" + desktop_string(python), "Exec=" + desktop_exec(argv),
        "Icon=" + desktop_string(str(icon)), "Terminal=false",
        "Categories=Network;Chat;InstantMessaging;",
        "StartupWMClass=Pychat", ""])  # Tk title-cases the class: Tk(className="PyChat")
    return {data / "applications" / "pychat.desktop": (entry.encode("utf-8"), False),
            icon: (png, False)}


def launcher_record(system: str, home: Path, env: Mapping[str, str]) -> Path:
    """Where install-desktop notes the files it wrote and the folders it made
    (next to the GUI's settings), so that uninstall removes exactly those."""
    return config_dir(system, home, env) / "launcher.json"


class Record:
    """What install-desktop wrote (path -> the sha256 of each version it
    wrote there) and the folders it made, deepest first.  `readable` is False
    for a file at the record's path that is not a record."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[Path, list[str]] = {}
        self.folders: list[Path] = []
        self.readable = True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.files = {Path(p): [h for h in hashes if isinstance(h, str)]
                          for p, hashes in data["files"].items()
                          if os.path.isabs(p) and isinstance(hashes, list)}
            self.folders = [Path(p) for p in data["folders"]
                            if isinstance(p, str) and os.path.isabs(p)]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.readable = False
            self.files, self.folders = {}, []

    def owns(self, path: Path, expected: bytes) -> bool:
        """Whether the file at `path` is PyChat's: a version install wrote
        there, or marked (text files), or the very bytes install writes (icons)."""
        try:
            content = path.read_bytes()
        except OSError:
            return False
        if hashlib.sha256(content).hexdigest() in self.files.get(path, ()):
            return True
        mark = LAUNCHER_MARK.encode()
        return mark in content if mark in expected else content == expected

    def add(self, files: dict[Path, tuple[bytes, bool]], made: set[Path]) -> bytes:
        """Note these files and folders; the record's new contents."""
        for path, (data, _) in files.items():
            digest = hashlib.sha256(data).hexdigest()
            self.files[path] = [*(h for h in self.files.get(path, []) if h != digest), digest]
        self.folders = sorted(set(self.folders) | made, key=lambda p: (-len(p.parts), str(p)))
        return json.dumps({"files": {str(p): h for p, h in self.files.items()},
                           "folders": [str(p) for p in self.folders]}, indent=1).encode()


def install_desktop(files: dict[Path, tuple[bytes, bool]], record_path: Path,
                    dry_run: bool = False, say: Callable[[str], None] = lambda line: None
                    ) -> list[str]:
    """Write the record, then the launcher's files (in place when they exist),
    then remove PyChat's files from places no longer used.  Returns the lines
    saying what was (or would be) done, each also given to `say` as it
    happens.  ValueError when a path holds a file PyChat did not write;
    OSError names the path that failed."""
    record = Record(record_path)
    if not record.readable:
        raise ValueError(f"{record_path} is not a launcher record PyChat can read; move it "
                         "away, then run install-desktop again")
    for path, (data, _) in files.items():
        if path.exists() and not record.owns(path, data):
            raise ValueError(f"{path} exists and was not written by PyChat; move it away, "
                             "then run install-desktop again")
    made = set()
    for path in [*files, record_path]:
        made.update(itertools.takewhile(lambda folder: not folder.exists(), path.parents))
    stale = [p for p in record.files if p not in files and record.owns(p, b"")]
    note = record.add(files, made)  # first: whatever fails later, uninstall knows
    said: list[str] = []
    for path, data, executable in [(record_path, note, False),
                                   *((p, d, x) for p, (d, x) in files.items())]:
        if not dry_run:
            _write_file(path, data, executable)
        said.append(f"{'would write' if dry_run else 'wrote'} {path} ({len(data)} bytes)")
        say(said[-1])
    for path in stale:  # where an earlier install put it (another XDG_DATA_HOME, say)
        if not dry_run:
            path.unlink()
        said.append(f"{'would remove' if dry_run else 'removed'} {path} (from an earlier "
                    "install)")
        say(said[-1])
    return said


def _write_file(path: Path, data: bytes, executable: bool = False) -> None:
    """Replace `path` with `data` atomically; OSError names `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        if executable:
            tmp.chmod(0o755)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OSError(e.errno, e.strerror, str(path)) from e


def uninstall_desktop(files: dict[Path, tuple[bytes, bool]], record_path: Path,
                      dry_run: bool = False) -> list[str]:
    """Remove the files install wrote (those in the record, and PyChat's own at
    today's paths), the record, then each folder install made if nothing else
    is in it; a file PyChat did not write stays.  Lines saying what was done."""
    record = Record(record_path)
    verb = "would remove" if dry_run else "removed"
    said, gone = [], set()
    for path in dict.fromkeys([*files, *record.files]):
        if not path.is_file():
            continue
        if record.owns(path, files.get(path, (b"", False))[0]):
            gone.add(path)
        else:
            said.append(f"left {path}: not written by PyChat")
    if record_path.is_file():
        if record.readable:
            gone.add(record_path)
        else:
            said.append(f"left {record_path}: not a launcher record PyChat can read")
    for path in [p for p in dict.fromkeys([*files, *record.files, record_path]) if p in gone]:
        if not dry_run:
            path.unlink()
        said.append(f"{verb} {path}")
    for folder in record.folders:  # deepest first
        if folder.is_dir() and all(p in gone for p in folder.iterdir()):
            gone.add(folder)
            if not dry_run:
                folder.rmdir()
            said.append(f"{verb} {folder}")
    return said


# ===========================================================================
# 8. Benchmark -- `python pychat.py bench`: a load generator that measures a
#    PyChat server (its own subprocess, or --host/--port), and a minimal
#    reference server to compare with.  Uses: constants, protocol.
#
# The load generator is built like the server: asyncio Protocols with their
# own line splitting, counting deliveries without parsing them, and parsing
# JSON only on a sample of receivers to measure latency.
# ===========================================================================

BENCH_LATENCY_SAMPLE = 10      # receivers that parse messages to time them
BENCH_WINDOW = 20              # an unpaced sender keeps this many messages in flight
BENCH_P99_TARGET_MS = 100      # "can host": 99 % of messages arrive within this; about the
                               # delay at which a conversation still feels instant


class BenchClient(asyncio.Protocol):
    """One simulated user: registers, then counts the messages it receives."""

    echoes = True             # a sender gets its own messages back, as everyone does
    PING = b'{"type":"ping","data":1}\n'

    @staticmethod
    def message(text: str) -> bytes:
        return encode({"type": "msg", "text": text})

    def __init__(self, nick: str, measure: bool):
        self.nick = nick
        self.measure = measure
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.received = 0
        self.latencies: list[float] = []
        self.welcomed = asyncio.get_running_loop().create_future()
        self.pongs = 0
        self.closed = False
        self.to_send = 0                     # unpaced sender: messages still to send
        self.users_seen = 0                  # the user list: as welcomed, plus joins
        self.echo_marker = b'"from":' + json.dumps(nick).encode() + b","
        self.writable: asyncio.Future | None = None  # set while the socket is full

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def send_next(self, count: int) -> None:
        """Send up to `count` more of this sender's messages."""
        count = min(count, self.to_send)
        if count > 0:
            self.to_send -= count
            self.send(b"".join(self.message(f"{time.time():.6f} x") for _ in range(count)))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(encode({"type": "hello", "nick": self.nick,  # type: ignore[attr-defined]
                                "client": "pychat-bench", "features": ["users_delta"]}))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.measure and not self.to_send and self.welcomed.done() \
                and b'"type":"p' not in buf and b'"type":"users' not in buf:
            # Fast path for plain receivers: count complete message lines without
            # splitting (a JSON string escapes its quotes, so the pattern can only
            # be a real "type" field).
            end = buf.rfind(b"\n") + 1
            self.received += buf.count(b'"type":"msg"', 0, end)
            self.users_seen += buf.count(b'"type":"join"', 0, end)
            self.buf = buf[end:]
            return
        lines = buf.split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            if b'"type":"msg"' in line:
                self.received += 1
                if self.to_send and self.echo_marker in line:
                    self.send_next(1)  # closed loop: one echo back, one more out
                if self.measure:
                    now = time.time()
                    try:
                        sent = float(json.loads(line)["text"].split(" ", 1)[0])
                    except (ValueError, KeyError, IndexError):
                        continue
                    self.latencies.append(now - sent)
            elif b'"type":"users"' in line:
                self.users_seen = len(json.loads(line).get("users", []))
                if not self.welcomed.done():
                    self.welcomed.set_result(True)
            elif b'"type":"users_delta"' in line:
                delta = json.loads(line)
                self.users_seen += len(delta["joined"]) - len(delta["left"])
            elif b'"type":"join"' in line:
                self.users_seen += 1
            elif b'"type":"pong"' in line:
                self.pongs += 1
            elif b'"type":"ping"' in line and self.transport is not None:
                self.transport.write(b'{"type":"pong"}\n')
            elif b'"type":"error"' in line and not self.welcomed.done():
                self.welcomed.set_exception(RuntimeError(line.decode("utf-8", "replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before welcome"))

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class BenchIrcClient(asyncio.Protocol):
    """One simulated IRC user (bench --irc, --proto irc): joins #lobby, counts
    the PRIVMSG lines it receives (parsing them only to time them), follows
    the channel's names as BenchClient follows its user list, answers PING.
    As a sender it writes PRIVMSG lines; an IRC server echoes none of them
    back, so an unpaced sender ends each window of BENCH_WINDOW messages with
    a PING and sends the next window when its PONG comes."""

    echoes = False            # a sender does not get its own messages
    PING = b"PING :bench\r\n"

    def __init__(self, nick: str, measure: bool = False):
        self.nick = nick
        self.measure = measure
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.received = 0
        self.latencies: list[float] = []
        self.welcomed = asyncio.get_running_loop().create_future()
        self.closed = False
        self.to_send = 0
        self.pongs = 0
        self.users_seen = 0
        self.writable: asyncio.Future | None = None  # set while the socket is full

    pause_writing = BenchClient.pause_writing
    resume_writing = BenchClient.resume_writing
    send = BenchClient.send

    @staticmethod
    def message(text: str) -> bytes:
        return f"PRIVMSG {LOBBY} :{text}\r\n".encode()

    def send_next(self, count: int) -> None:
        count = min(count, self.to_send)
        if count > 0:
            self.to_send -= count
            self.send(b"".join(self.message(f"{time.time():.6f} x") for _ in range(count))
                      + self.PING)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(f"NICK {self.nick}\r\nUSER {self.nick} 0 * :bench\r\n"  # type: ignore
                        f"JOIN {LOBBY}\r\n".encode())

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.rfind(b"\n") + 1
        if not self.measure and self.welcomed.done() and b" JOIN " not in buf and \
                b"PING" not in buf and b" PONG " not in buf and b" QUIT " not in buf:
            self.received += buf.count(b" PRIVMSG ", 0, end)  # the fast path: count only
            self.buf = buf[end:]
            return
        lines = buf.split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        words = line.split(b" ", 3)
        command = words[1] if line.startswith(b":") and len(words) > 1 else words[0]
        if command == b"PRIVMSG":
            self.received += 1
            if self.measure:
                try:
                    sent = float(line.split(b" :", 1)[1].split(b" ", 1)[0])
                except (IndexError, ValueError):
                    return
                self.latencies.append(time.time() - sent)
        elif command == b"353":  # names: the last field lists them
            self.users_seen += len(line.rsplit(b" :", 1)[-1].split())
        elif command == b"366" and not self.welcomed.done():
            self.welcomed.set_result(True)
        elif command == b"JOIN" and self.welcomed.done():
            self.users_seen += 1
        elif command in (b"PART", b"QUIT"):
            self.users_seen -= 1
        elif command == b"PING" and self.transport is not None:
            self.transport.write(b"PONG :" + line.rsplit(b" ", 1)[-1].lstrip(b":") + b"\r\n")
        elif command == b"PONG":
            self.pongs += 1
            self.send_next(BENCH_WINDOW)  # (an unpaced sender: the next window)
        elif command in (b"433", b"432", b"ERROR") and not self.welcomed.done():
            self.welcomed.set_exception(RuntimeError(line.decode("utf-8", "replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before joining"))


class BenchWsClient(asyncio.Protocol):
    """One simulated browser (bench --ws): a WebSocket on /ws, masked frames
    out, counts the msg events it receives, answers the server's keepalive
    ping frame.  A receiver only."""

    PING = bytes((0x89, 9)) + b"keepalive"   # the server's keepalive frame, whole

    def __init__(self, nick: str, measure: bool = False):
        self.nick = nick
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.received = 0
        self.latencies: list[float] = []
        self.welcomed = asyncio.get_running_loop().create_future()
        self.closed = False
        self.to_send = 0

    def frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else \
            struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        return head + mask + ws_unmask(payload, mask)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("peername")[:2]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\n"  # type: ignore
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        .encode() + self.frame(0x1, encode({"type": "hello", "nick": self.nick,
                                                             "client": "pychat-bench"})[:-1]))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.upgraded = True
            buf = buf[end + 4:]
        # Frames are counted without parsing them, as BenchClient counts lines:
        # a message's text cannot hold the pattern unescaped.
        self.received += buf.count(b'"type":"msg"')
        if not self.welcomed.done() and b'"type":"users"' in buf:
            self.welcomed.set_result(True)
        if self.PING in buf and self.transport is not None:
            self.transport.write(self.frame(0xA, b"keepalive"))
        self.buf = buf[-20:]  # a pattern split across reads is counted once, after it
        self.received -= self.buf.count(b'"type":"msg"')

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before joining"))


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def process_stats(pid: int) -> dict[str, float]:
    """CPU seconds and resident/peak memory (KiB) of a process, where the OS tells
    (Linux /proc); empty elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"cpu": (int(stat[11]) + int(stat[12])) / ticks,
            "rss_kib": float(fields.get("VmRSS", "0 kB").split()[0]),
            "peak_kib": float(fields.get("VmHWM", "0 kB").split()[0])}


class Progress:
    """A one-line progress bar on stderr (plain lines when it is not a terminal)."""

    def __init__(self, quiet: bool = False):
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.last = 0.0

    def show(self, label: str, done: float, total: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 2 and done < total:
            return
        self.last = now
        share = 0 if total <= 0 else min(1.0, done / total)
        bar = "#" * int(share * 30)
        line = f"{label:<12} [{bar:<30}] {share * 100:5.1f}%"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and share >= 1:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _connect_clients(host: str, port: int, count: int, measure: int,
                           progress: Progress, prefix: str = "b",
                           irc: int = 0, ws: int = 0, everyone: type | None = None,
                           last: tuple[int, int] = (0, 0)) -> list[Any]:
    """Open and register `count` clients, a few hundred connects at a time;
    `irc` of them (after the `measure` ones) come by IRC, and the next `ws`
    by WebSocket; or all of them as `everyone` (BenchIrcClient: --proto irc).
    `last`: that many of the last clients (the senders) go to that port
    (bench --link: another server of the network)."""
    loop = asyncio.get_running_loop()
    clients: list[Any] = []
    step = 200
    for start in range(0, count, step):
        batch = []
        for i in range(start, min(count, start + step)):
            kind = everyone or (BenchIrcClient if measure <= i < measure + irc else
                                BenchWsClient if measure + irc <= i < measure + irc + ws
                                else BenchClient)
            client = kind(f"{prefix}{i}", i < measure)
            await loop.create_connection(lambda c=client: c, host,
                                         last[1] if i >= count - last[0] else port)
            batch.append(client)
        await asyncio.wait_for(asyncio.gather(*(c.welcomed for c in batch)), 120)
        clients.extend(batch)
        progress.show("connecting", len(clients), count)
    return clients


async def _bench_sender(client: BenchClient, messages: int, rate: float,
                        open_loop: bool = False) -> None:
    """One sender: `rate` messages a second, or (rate 0, unpaced) as fast as
    the server echoes, with a window of messages in flight; open loop (rate
    0): as fast as it can, one message per write, never waiting for echoes
    (the loop turns once between writes, so receivers keep reading).  Paced
    and open-loop senders wait while their socket is full, as a real
    client's write would: what the server has not read stays in TCP's
    buffers, not in a queue of the generator's own."""
    if rate <= 0 and not open_loop:
        client.to_send = messages
        client.send_next(BENCH_WINDOW)
        return
    next_at = time.monotonic()
    for _ in range(messages):
        if client.writable is not None:  # a real client's socket would block here too
            await client.writable
        client.send(client.message(f"{time.time():.6f} x"))
        if rate > 0:
            next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _bench_deliveries(clients: list, expected: int, progress: Progress,
                            deadline: float) -> int:
    """Wait until every delivery arrived, a client was dropped, or time is up."""
    while True:
        got = sum(c.received for c in clients)
        progress.show("fanout", got, expected)
        if got >= expected or time.monotonic() > deadline or any(c.closed for c in clients):
            return got
        await asyncio.sleep(0.05)


def bench_wires(proto: str, args: argparse.Namespace, clients: int) -> tuple[int, int]:
    """How many receivers join by IRC and by WebSocket: --irc and --ws (json),
    all of them (ws), or a third each of JSON, IRC and WebSocket (mixed).
    (With irc every client speaks IRC, senders too: see bench_fanout.)"""
    room = max(0, clients - args.senders - min(BENCH_LATENCY_SAMPLE, clients))
    return {"irc": (0, 0), "ws": (0, room), "mixed": (room // 3, room // 3)}.get(
        proto, (args.irc, args.ws))


async def bench_fanout(host: str, port: int, clients_n: int, senders: int, messages: int,
                       rate: float, progress: Progress, timeout: float,
                       server_pid: int | None, irc: int = 0,
                       ws: int = 0, open_loop: bool = False, wire: str = "json",
                       prefix: str = "b", senders_port: int = 0) -> dict[str, Any]:
    """N clients in one room; S of them send M messages each; everyone counts
    (`irc` of the receivers by IRC, `ws` by WebSocket; with wire "irc" every
    client, senders too, speaks IRC).  With `senders_port`, the senders are
    on that server and everyone else on this one (bench --link)."""
    started = time.monotonic()
    room = clients_n - senders - min(BENCH_LATENCY_SAMPLE, clients_n)  # plain receivers
    if irc + ws > max(0, room):
        raise PyChatError(f"--irc {irc} --ws {ws}: at most {max(0, room)} of these clients "
                          "can be IRC or WebSocket "
                          f"receivers (not senders, nor the {BENCH_LATENCY_SAMPLE} that time "
                          "messages)")
    clients = await _connect_clients(host, port, clients_n, BENCH_LATENCY_SAMPLE, progress,
                                     prefix, irc=irc, ws=ws,
                                     everyone=BenchIrcClient if wire == "irc" else None,
                                     last=(senders, senders_port) if senders_port else (0, 0))
    connect_s = time.monotonic() - started
    if senders_port:  # the network must know everyone is in the room before they send
        deadline = time.monotonic() + 120
        while any(c.users_seen < clients_n for c in clients[-senders:]):
            if time.monotonic() > deadline:
                raise PyChatError("the other server never showed every receiver")
            await asyncio.sleep(0.05)
    before = process_stats(server_pid) if server_pid else {}
    # Every message reaches every member, its sender too unless the wire
    # echoes nothing (IRC).
    expected = sum(messages * (clients_n - (not c.echoes)) for c in clients[-senders:])
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    cpu0 = time.process_time()
    tasks = [loop.create_task(_bench_sender(c, messages, rate, open_loop))
             for c in clients[-senders:]]
    got = await _bench_deliveries(clients, expected, progress, t0 + timeout)
    elapsed = time.monotonic() - t0
    gen_cpu = time.process_time() - cpu0
    after = process_stats(server_pid) if server_pid else {}
    for t in tasks:
        t.cancel()
    latencies = [x for c in clients for x in c.latencies]
    result = {
        "scenario": "fanout", "wire": wire, "clients": clients_n, "irc_clients": irc,
        "ws_clients": ws, "senders": senders,
        "messages": messages,
        "rate": rate, "open_loop": open_loop, "connect_seconds": round(connect_s, 3),
        "connects_per_second": round(clients_n / connect_s, 1) if connect_s else None,
        "sent": senders * messages, "expected_deliveries": expected,
        "received_deliveries": got, "lost": expected - got,
        "deliveries_per_second": round(got / elapsed) if elapsed else None,
        "seconds": round(elapsed, 3),
        "latency_ms": {p: round(_percentile(latencies, q) * 1000, 2)
                       for p, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "generator_cpu_percent": round(100 * gen_cpu / elapsed, 1) if elapsed else None,
        "dropped_clients": sum(c.closed for c in clients),
    }
    if before and after:
        cpu = after["cpu"] - before["cpu"]
        result.update(server_cpu_percent=round(100 * cpu / elapsed, 1),
                      server_us_per_delivery=round(cpu / got * 1e6, 3) if got else None,
                      server_peak_rss_mib=round(after["peak_kib"] / 1024, 1))
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return result


async def bench_connections(host: str, port: int, clients_n: int, progress: Progress,
                            server_pid: int | None, wire: str = "json",
                            prefix: str = "idle") -> dict[str, Any]:
    """Hold N idle registered clients (all by IRC with wire "irc"); check a
    sample answers pings and saw the whole user list."""
    before = process_stats(server_pid) if server_pid else {}
    started = time.monotonic()
    clients = await _connect_clients(host, port, clients_n, 0, progress, prefix=prefix,
                                     everyone=BenchIrcClient if wire == "irc" else None)
    connect_s = time.monotonic() - started
    sample = clients[:: max(1, clients_n // 50)]
    deadline = time.monotonic() + 60  # every member's user list must come out exact
    while any(c.users_seen < clients_n for c in sample) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    exact = sum(c.users_seen == clients_n for c in sample)
    # Memory is measured in the steady state: after the join storm and the
    # server's clean-up once a burst of connections has settled.
    if server_pid:
        await asyncio.sleep(TRIM_SETTLED)
    after = process_stats(server_pid) if server_pid else {}
    for c in sample:
        c.send(c.PING)
    deadline = time.monotonic() + 30
    while sum(c.pongs > 0 for c in sample) < len(sample) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    result = {"scenario": "connections", "wire": wire, "clients": clients_n,
              "connect_seconds": round(connect_s, 3),
              "connects_per_second": round(clients_n / connect_s, 1) if connect_s else None,
              "alive_in_sample": f"{sum(c.pongs > 0 for c in sample)}/{len(sample)}",
              "exact_user_lists_in_sample": f"{exact}/{len(sample)}",
              "open": sum(not c.closed for c in clients)}
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    if before and after:
        await _wait_room_empty(host, port)
        await asyncio.sleep(TRIM_SETTLED)  # the server's own clean-up after a burst
        left = process_stats(server_pid) if server_pid else {}
        result.update(server_rss_mib=round(after["rss_kib"] / 1024, 1),
                      server_peak_rss_mib=round(after["peak_kib"] / 1024, 1),
                      rss_kib_per_connection=round((after["rss_kib"] - before["rss_kib"])
                                                   / clients_n, 2),
                      rss_before_mib=round(before["rss_kib"] / 1024, 1),
                      rss_after_leaving_mib=round(left.get("rss_kib", 0) / 1024, 1))
    return result


async def _wait_room_empty(host: str, port: int, timeout: float = 60) -> None:
    """Join with one more client and ask for the user list until the server
    has noticed every other client leave."""
    probe = BenchClient("probe", True)  # True: parses every line, user lists too
    await asyncio.get_running_loop().create_connection(lambda: probe, host, port)
    try:
        await asyncio.wait_for(probe.welcomed, timeout)
        deadline = time.monotonic() + timeout
        while probe.users_seen > 1 and time.monotonic() < deadline:
            probe.send(encode({"type": "users"}))
            await asyncio.sleep(0.1)
    finally:
        if probe.transport is not None:
            probe.transport.close()


class _RefSession(asyncio.Protocol):
    """The reference server's connection: the bare minimum, written for speed."""

    def __init__(self, ref: ReferenceServer):
        self.ref = ref
        self.buf = b""
        self.out: list[bytes] = []
        self.nick = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ref.members.discard(self)

    def data_received(self, data: bytes) -> None:
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "hello":
                self.nick = str(msg.get("nick"))
                self.queue(encode({"type": "welcome", "nick": self.nick, "room": LOBBY}))
                self.ref.members.add(self)
                self.queue(encode({"type": "users", "room": LOBBY, "users": [self.nick]}))
            elif msg.get("type") == "msg" and self.nick:
                self.ref.next_id += 1
                data = encode({"type": "msg", "room": LOBBY, "from": self.nick,
                               "text": msg.get("text"), "ts": time.time(),
                               "id": self.ref.next_id})
                for member in self.ref.members:
                    member.queue(data)
            elif msg.get("type") == "ping":
                self.queue(encode({"type": "pong", "data": msg.get("data")}))

    def queue(self, data: bytes) -> None:
        if not self.out:
            self.ref.dirty.append(self)
            if len(self.ref.dirty) == 1:
                asyncio.get_running_loop().call_soon(self.ref.flush)
        self.out.append(data)


class ReferenceServer:
    """Minimal coalescing asyncio chat server: what pure-Python asyncio can do
    with no limits, no validation and no features; `bench --reference` runs the
    same load against it for comparison."""

    def __init__(self) -> None:
        self.members: set[_RefSession] = set()
        self.dirty: list[_RefSession] = []
        self.next_id = 0

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for s in dirty:
            if s.transport is not None and not s.transport.is_closing():
                s.transport.write(b"".join(s.out))
            s.out = []

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: _RefSession(self), host, port)
        print(f"reference server listening (port {server.sockets[0].getsockname()[1]})",
              flush=True)
        await asyncio.Event().wait()


async def _start_server_process(cmd: list[str], env: dict | None = None,
                                expect: bytes = b"") -> tuple[asyncio.subprocess.Process, int]:
    """Start a server subprocess on 127.0.0.1 and read the port it prints
    (and, before it, a line starting with `expect`, if given)."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    lines = [await asyncio.wait_for(proc.stdout.readline(), 60)]
    while lines[-1] and b"(port " not in lines[-1] and len(lines) < 5:
        lines.append(await asyncio.wait_for(proc.stdout.readline(), 60))
    match = re.search(rb"\(port (\d+)\)", lines[-1])
    if not match or not any(line.startswith(expect) for line in lines):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the server did not start: {b''.join(lines)!r}")
    return proc, int(match.group(1))


async def _stop_server_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def run_bench(args: argparse.Namespace) -> list[dict]:
    """Run the chosen scenario for each client count and each --proto wire
    against our server (and the reference, and --against); one result per
    run, in that order."""
    _raise_open_files(2 * max(args.clients) + 256)
    progress = Progress(quiet=args.json)
    targets = [("pychat", bench_server_command(args))]
    if args.reference:
        targets.append(("reference", [sys.executable, str(Path(__file__).resolve()), "bench",
                                      "--serve-reference"]))
    if args.against:
        targets.append((args.against, None))
    results: list[dict] = []
    for clients in args.clients:
        first = len(results)
        for wire in args.proto:
            for name, cmd in targets:
                if (name == "reference" and wire != args.proto[0]) or \
                        (cmd is None and wire != "irc"):
                    continue  # the reference speaks JSON lines, --against IRC
                results.append(await _bench_one(args, name, cmd, clients, wire,
                                                f"b{len(results)}n", progress))
        if args.link:
            results.append(await _bench_link(args, clients, f"b{len(results)}n", progress))
        _compare(results[first:])
    return results


def bench_server_command(args: argparse.Namespace) -> list[str]:
    """How bench starts a PyChat server: no limits that would stop its load."""
    return [sys.executable, str(Path(__file__).resolve()), "server",
            "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
            "--flood-rate", "0", "--ping-interval", "0", "--max-clients", "0",
            "--max-per-address", "0", "--connect-rate", "0", "--no-announce",
            *args.server_arg]


def ngircd_hub(name: str, port: int, leaves: list[str], password: str) -> str:
    """An ngircd config for a hub on 127.0.0.1:`port` that the servers
    `leaves` may link to with `password` (bench --link, and the tests)."""
    text = (f"[Global]\n    Name = {name}\n    Info = a PyChat network's hub\n"
            f"    Listen = 127.0.0.1\n    Ports = {port}\n"
            "[Limits]\n    MaxConnections = 0\n    MaxConnectionsIP = 0\n    MaxJoins = 0\n"
            "    MaxNickLength = 32\n    MaxPenaltyTime = 0\n"
            "[Options]\n    DNS = no\n    Ident = no\n    PAM = no\n")
    for leaf in leaves:
        text += (f"[Server]\n    Name = {leaf}\n    MyPassword = {password}\n"
                 f"    PeerPassword = {password}\n")
    return text


async def _bench_link(args: argparse.Namespace, clients: int, prefix: str,
                      progress: Progress) -> dict:
    """The same load across a network: a fresh ngircd hub, PyChat servers
    a.bench and b.bench linked to it, the senders on a.bench and everyone
    else (the timed receivers too) on b.bench; CPU is b.bench's."""
    ngircd = shutil.which("ngircd")
    if ngircd is None:
        raise PyChatError("bench --link runs an ngircd hub: install ngircd (Debian: "
                          "apt-get install ngircd) or put it on PATH")
    password = secrets.token_hex(8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        hub_port = s.getsockname()[1]
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "hub.conf"
        conf.write_text(ngircd_hub("hub.bench", hub_port, ["a.bench", "b.bench"], password))
        hub = await asyncio.create_subprocess_exec(ngircd, "-n", "-f", str(conf),
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(200):  # until it listens
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", hub_port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            env = {**os.environ, "PYCHAT_LINK_PASSWORD": password}
            ports = []
            for name in ("a.bench", "b.bench"):
                proc, port = await _start_server_process(
                    [*bench_server_command(args), "--link", f"127.0.0.1:{hub_port}",
                     "--link-name", name], env, expect=b"Linked to")
                procs.append(proc)
                ports.append(port)
            result = await bench_fanout("127.0.0.1", ports[1], clients, args.senders,
                                        args.messages, args.rate, progress, args.timeout,
                                        procs[1].pid, open_loop=args.open_loop, prefix=prefix,
                                        senders_port=ports[0])
        finally:
            for proc in [*procs, hub]:
                await _stop_server_process(proc)
    result["server"] = "a->ngircd->b"
    return result


async def _bench_one(args: argparse.Namespace, name: str, cmd: list[str] | None, clients: int,
                     wire: str, prefix: str, progress: Progress) -> dict:
    """One run: a fresh server (or --host/--port's, or --against's), one load."""
    proc = None
    if cmd is None:  # --against HOST:PORT: another IRC server, already running
        host, _, num = name.rpartition(":")
        host, port, pid = host.strip("[]"), int(num), pid_listening(int(num))
    elif args.port and name == "pychat":  # a running server: its CPU if /proc shows it
        host, port, pid = args.host, args.port, pid_listening(args.port)
        await _wait_room_empty(host, port)  # the last run's clients must be gone
    else:  # a fresh server for each run: nothing left over from the last
        proc, port = await _start_server_process(cmd)
        host, pid = "127.0.0.1", proc.pid
    try:
        if args.scenario == "fanout":
            irc, ws = bench_wires(wire, args, clients) if name == "pychat" else (0, 0)
            result = await bench_fanout(host, port, clients, args.senders, args.messages,
                                        args.rate, progress, args.timeout, pid, irc, ws,
                                        args.open_loop, "irc" if wire == "irc" else "json",
                                        prefix)
            result["wire"] = wire
        else:
            # (memory only of a server it started: another's may not be idle)
            result = await bench_connections(host, port, clients, progress,
                                             pid if proc is not None else None,
                                             "irc" if wire == "irc" else "json", prefix)
    finally:
        if proc is not None:
            await _stop_server_process(proc)
    result["server"] = name
    return result


def _compare(rows: list[dict]) -> None:
    """Ratios between the runs of one client count: PyChat's deliveries/s as a
    share of the reference's (vs_reference), and of --against's (vs_against)."""
    ours = next((r for r in rows if r["server"] == "pychat"), None)
    for r in rows:
        if ours is None or r is ours or not r.get("deliveries_per_second") or \
                not ours.get("deliveries_per_second"):
            continue
        if r["server"] == "reference":
            ours["vs_reference"] = round(ours["deliveries_per_second"]
                                         / r["deliveries_per_second"], 3)
        elif r["server"] == "a->ngircd->b":
            r["vs_one_server"] = round(r["deliveries_per_second"]
                                       / ours["deliveries_per_second"], 3)
        elif r["server"] != "pychat":
            irc = next((x for x in rows if x["server"] == "pychat" and x["wire"] == "irc"), None)
            if irc is not None and irc.get("deliveries_per_second"):
                irc["vs_against"] = round(irc["deliveries_per_second"]
                                          / r["deliveries_per_second"], 3)


def pid_listening(port: int) -> int | None:
    """The process listening on a local TCP port, where /proc tells (Linux);
    None elsewhere or when it is not this user's to see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def _bench_ok(r: dict) -> bool:
    """Did this run keep its promise: everyone served, nothing lost, and (for
    fan-out) p99 latency under BENCH_P99_TARGET_MS?"""
    if r["scenario"] == "connections":
        alive, sample = r["alive_in_sample"].split("/")
        return r["open"] == r["clients"] and alive == sample
    p99 = r["latency_ms"]["p99"]  # NaN when nothing was timed
    return r["lost"] == 0 and not r["dropped_clients"] and p99 < BENCH_P99_TARGET_MS


def bench_verdict(results: list[dict]) -> str:
    """The one-sentence answer to "how many people can my machine host?",
    from PyChat's measured rows (not the reference's).

    N is the largest measured client count that kept the promise (_bench_ok)
    while every smaller measured count kept it too; so one noisy small run
    that failed makes the answer smaller, never larger.  When every count
    passed, N is only a lower bound ("at least"); when none did, the answer
    is "fewer than" the smallest count measured."""
    wire = results[0].get("wire", "json")  # (the first --proto's runs)
    rows = sorted((r for r in results if r["server"] == "pychat" and
                   r.get("wire", "json") == wire), key=lambda r: r["clients"])
    fanout = rows[0]["scenario"] == "fanout"
    what = "idle connections"
    if fanout:
        load = "unpaced" if rows[0]["rate"] <= 0 else f"{rows[0]['rate']:g} messages/s each"
        if rows[0].get("open_loop"):
            load += ", open loop"
        what = f"active chatters ({rows[0]['senders']} sending, {load})"
    promise = (f"at p99 under {BENCH_P99_TARGET_MS} ms with nothing lost" if fanout
               else "with a sample of them all answering pings")
    first_bad = next((r for r in rows if not _bench_ok(r)), None)
    good = [r["clients"] for r in rows if first_bad is None or r["clients"] < first_bad["clients"]]
    if first_bad is None:
        return (f"This machine can host at least {good[-1]:,} {what} {promise} (the largest "
                f"count measured; try more with --clients).")
    bad = f"{first_bad['clients']:,}"
    if fanout:
        p99, lost, dropped = (first_bad["latency_ms"]["p99"], first_bad["lost"],
                              first_bad["dropped_clients"])
        bad += (f" lost {lost:,} and dropped {dropped}" if lost or dropped
                else " timed nothing" if math.isnan(p99) else f" had p99 {p99:.1f} ms")
    else:
        bad += f" had {first_bad['open']:,} open, {first_bad['alive_in_sample']} answering"
    if not good:
        return (f"This machine can host fewer than {first_bad['clients']:,} {what} {promise}, "
                f"the smallest count measured ({bad}); try fewer with --clients.")
    return (f"This machine can host about {good[-1]:,} {what} {promise}: the largest count "
            f"measured that did ({bad}).")


def _bench_rate(r: dict) -> str:
    if r.get("open_loop") and r["rate"] <= 0:
        return ("open loop (--open-loop: each sender writes one message at a time as fast "
                "as it can, never waiting for echoes)")
    if r["rate"] <= 0:
        return (f"unpaced (--rate 0: each sender keeps {BENCH_WINDOW} messages in flight, "
                "sending the next when one comes back)")
    return f"paced at {r['rate']:g} messages/s per sender"


def _bench_label(r: dict) -> str:
    """A run's server, and its wire when that is not JSON lines."""
    wire = r.get("wire", "json")
    return r["server"] if wire == "json" or r["server"] == "reference" else \
        f"{r['server']} {wire}"


def _wire_comparisons(results: list[dict]) -> list[str]:
    """What an IRC member costs beside a JSON one, and PyChat's IRC path beside
    --against's, count by count, where both were measured."""
    lines = []
    for n in sorted({r["clients"] for r in results}):
        runs = {(r["server"], r.get("wire", "json")): r for r in results if r["clients"] == n}
        json_run, irc_run = runs.get(("pychat", "json")), runs.get(("pychat", "irc"))
        if json_run and irc_run and json_run.get("server_us_per_delivery") and \
                irc_run.get("server_us_per_delivery") and json_run["deliveries_per_second"]:
            lines.append(
                f"At {n:,} clients an IRC member costs the server "
                f"{irc_run['server_us_per_delivery'] / json_run['server_us_per_delivery']:.2f}"
                " times the CPU per delivery of a JSON member, and IRC members got "
                f"{irc_run['deliveries_per_second'] / json_run['deliveries_per_second']:.2f}"
                " times the deliveries per second.")
        link = runs.get(("a->ngircd->b", "json"))
        if json_run and link and "vs_one_server" in link:
            lines.append(f"At {n:,} clients, across the network (senders on one PyChat "
                         f"server, receivers on another, through ngircd): "
                         f"{link['vs_one_server']:.2f} times one server's deliveries per "
                         f"second, p99 {link['latency_ms']['p99']:.1f} ms against "
                         f"{json_run['latency_ms']['p99']:.1f} ms.")
        other = next((r for (s, w), r in runs.items()
                      if s not in ("pychat", "reference", "a->ngircd->b")), None)
        if irc_run and other and "vs_against" in irc_run:
            p99 = (irc_run["latency_ms"]["p99"] / other["latency_ms"]["p99"]
                   if other["latency_ms"]["p99"] else float("nan"))
            lines.append(f"At {n:,} clients PyChat's IRC path delivered {irc_run['vs_against']:.2f}"
                         f" times {other['server']}'s deliveries per second, at {p99:.2f} "
                         "times its p99 latency.")
    return lines


def _fixed(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def format_bench(results: list[dict]) -> str:
    """A table of bench results, one row per run (at most 80 columns wide),
    its footnotes, and bench_verdict's sentence last."""
    first = results[0]
    if first["scenario"] == "fanout":
        irc = f", {first['irc_clients']} receivers by IRC" if first.get("irc_clients") else ""
        irc += f", {first['ws_clients']} by WebSocket" if first.get("ws_clients") else ""
        senders = f"{first['senders']} sender{'s' * (first['senders'] != 1)}"
        about = [f"{senders} x {first['messages']} messages{irc}, {_bench_rate(first)}."]
        head = ["clients", "server", "deliveries/s", "p50 ms", "p99 ms", "lost",
                "us/deliv", "peak MiB"]
        rows = [[r["clients"], _bench_label(r), r["deliveries_per_second"],
                 f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p99']:.1f}",
                 r["lost"],
                 _fixed(r.get("server_us_per_delivery"), 2),
                 _fixed(r.get("server_peak_rss_mib"), 1)]
                for r in results]
        busy = max(r.get("generator_cpu_percent") or 0 for r in results)
        about_after = ["deliveries/s: deliveries per second (messages received, summed over all "
                       "clients); p50/p99: "
                       f"latency on {BENCH_LATENCY_SAMPLE} receivers; us/deliv: server CPU "
                       "microseconds per delivery."]
        dropped = [f"{r['dropped_clients']:,} at {r['clients']:,} clients ({r['server']})"
                   for r in results if r["dropped_clients"]]
        if dropped:
            about_after.append(f"Clients dropped as too slow: {', '.join(dropped)}.")
        shares = [f"{r['vs_reference']:g} at {r['clients']:,} clients" for r in results
                  if "vs_reference" in r]
        if shares:
            about_after.append("PyChat's deliveries/s as a share of the reference "
                               f"server's: {', '.join(shares)}.")
        about_after += _wire_comparisons(results)
        if busy >= 90:
            about_after.append(f"The load generator used up to {busy:g} % of a core: the "
                               "busiest rows measure it as much as the server.")
    else:
        about = ["Idle clients, all joining the lobby."]
        head = ["clients", "server", "open", "pinged", "exact lists", "join s",
                "KiB/conn", "peak MiB"]
        rows = [[r["clients"], _bench_label(r), r["open"], r["alive_in_sample"],
                 r["exact_user_lists_in_sample"], r["connect_seconds"],
                 _fixed(r.get("rss_kib_per_connection"), 1),
                 _fixed(r.get("server_peak_rss_mib"), 1)]
                for r in results]
        about_after = ["pinged and exact lists: of a sample of clients, those that answered "
                       "a ping and saw the whole user list; KiB/conn: server memory per "
                       "connection."]
    cells = [head] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in row]
                      for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # the server's name: left
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    title = (f"PyChat bench: {first['scenario']} (Python {sys.version.split()[0]}, "
             f"{os.cpu_count()} CPUs). " + " ".join(about))
    prose = textwrap.TextWrapper(width=79, break_on_hyphens=False).fill
    return "\n".join([prose(title), *table, *map(prose, about_after),
                      prose(bench_verdict(results))])


# ===========================================================================
# 8b. QR code -- qr_matrix(), qr_text(), print_links(): the server's link as
#     a QR code in the terminal, for phones.  Uses: terminal client
#     (enable_windows_ansi, for colours only).
#
# A QR Code model 2 encoder after ISO/IEC 18004 (2006 and 2015 editions),
# cut down to what a link needs: byte mode only, error correction level M
# only (about 15 % of the symbol may be lost), versions 1-40, the smallest
# that fits.  The standard's tables are computed here rather than copied,
# except one:
#   - Table 3 (character count indicator bits): 8 for byte mode in
#     versions 1-9, 16 from 10 on;
#   - Table 7 (capacities): the codewords a version holds are its modules
#     less the function patterns', counted by _qr_codewords();
#   - Table 9 (error correction characteristics), level M rows: the one
#     table kept, as EC codewords per block and number of blocks; where the
#     codewords do not divide evenly the later blocks hold one more data
#     codeword, as the table's second block group does;
#   - Annex A (generator polynomials): the product of (x - a^i), i < n,
#     over GF(256) modulo x^8+x^4+x^3+x^2+1;
#   - Annex C and D (format and version information): the BCH(15,5) code,
#     generator 0x537, masked with 0x5412; the BCH(18,6) code, 0x1F25;
#   - Annex E (alignment pattern positions): evenly spaced from the far
#     edge towards row/column 6, the spacing rounded up to even;
#   - Table 10 (mask conditions) and the penalty rules (N1=3, N2=3, N3=40,
#     N4=10): all 8 masks are scored and the lowest taken.
# The tests read the codes back with zbar, a real decoder, in every version.
# ===========================================================================

# Table 9, level M: (EC codewords per block, number of blocks) for versions 1-40.
QR_M_EC_PER_BLOCK = (10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26,
                     26, 26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28,
                     28, 28, 28, 28)
QR_M_BLOCKS = (1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18,
               20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)
QR_QUIET_ZONE = 4  # light modules the standard asks for around the symbol
# Table 10: mask condition per mask number, i = row, j = column; true flips the module.
QR_MASKS: tuple[Callable[[int, int], bool], ...] = (
    lambda i, j: (i + j) % 2 == 0, lambda i, j: i % 2 == 0,
    lambda i, j: j % 3 == 0, lambda i, j: (i + j) % 3 == 0,
    lambda i, j: (i // 2 + j // 3) % 2 == 0, lambda i, j: i * j % 2 + i * j % 3 == 0,
    lambda i, j: (i * j % 2 + i * j % 3) % 2 == 0, lambda i, j: ((i + j) % 2 + i * j % 3) % 2 == 0)

# GF(256) with the QR polynomial 0x11D: exponents of the generator a = 2 and their logs.
_GF_EXP = [1] * 512
for _i in range(1, 512):
    _GF_EXP[_i] = _GF_EXP[_i - 1] * 2 ^ (0x11D if _GF_EXP[_i - 1] & 0x80 else 0)
_GF_LOG = {_GF_EXP[_i]: _i for _i in range(254, -1, -1)}


def _gf_mul(a: int, b: int) -> int:
    return _GF_EXP[_GF_LOG[a] + _GF_LOG[b]] if a and b else 0


def rs_generator(degree: int) -> list[int]:
    """The Reed-Solomon generator polynomial prod(x - a^i, i < degree), highest power first."""
    poly = [1]
    for i in range(degree):  # poly * (x + a^i): shift, and add poly scaled by a^i
        poly = [hi ^ _gf_mul(lo, _GF_EXP[i]) for hi, lo in zip(poly + [0], [0] + poly)]
    return poly


def rs_ec_codewords(data: list[int], degree: int) -> list[int]:
    """The error correction codewords for `data`: the remainder of data * x^degree
    divided by the generator polynomial."""
    gen = rs_generator(degree)
    rem = [0] * degree
    for byte in data:
        factor = byte ^ rem[0]
        rem = [r ^ _gf_mul(g, factor) for r, g in zip(rem[1:] + [0], gen[1:])]
    return rem


def _qr_codewords(version: int) -> int:
    """All codewords a version holds: its modules less finders, separators, timing,
    format and version information and alignment patterns, in bytes."""
    modules = (16 * version + 128) * version + 64
    if version >= 2:
        n = version // 7 + 2  # alignment positions per row
        modules -= (25 * n - 10) * n - 55
        if version >= 7:
            modules -= 36
    return modules // 8


def _qr_data_codewords(version: int) -> int:
    return _qr_codewords(version) - QR_M_EC_PER_BLOCK[version - 1] * QR_M_BLOCKS[version - 1]


def _qr_alignment(version: int) -> list[int]:
    """Annex E: the rows (and columns) of the alignment patterns' centres."""
    if version == 1:
        return []
    n, size = version // 7 + 2, version * 4 + 17
    step = (version * 8 + n * 3 + 5) // (n * 4 - 4) * 2
    return [6] + [size - 7 - k * step for k in range(n - 2, -1, -1)]


def _qr_codeword_sequence(data: bytes, version: int) -> list[int]:
    """Byte mode bits, terminator and padding, split into blocks, EC added, interleaved."""
    count_bits = 8 if version < 10 else 16
    bits = f"0100{len(data):0{count_bits}b}" + "".join(f"{b:08b}" for b in data)
    capacity = _qr_data_codewords(version) * 8
    bits += "0" * min(4, capacity - len(bits))  # the terminator, cut short if full
    bits += "0" * (-len(bits) % 8)
    words = [int(bits[k:k + 8], 2) for k in range(0, len(bits), 8)]
    words += [0xEC, 0x11] * ((capacity // 8 - len(words)) // 2 + 1)
    words = words[:capacity // 8]
    ec, blocks = QR_M_EC_PER_BLOCK[version - 1], QR_M_BLOCKS[version - 1]
    total = _qr_codewords(version)
    short = blocks - total % blocks  # blocks one data codeword shorter than the rest
    short_len = total // blocks - ec
    split, at = [], 0
    for b in range(blocks):
        n = short_len + (b >= short)
        split.append(words[at:at + n])
        at += n
    out = [blk[k] for k in range(short_len + 1) for blk in split if k < len(blk)]
    ecs = [rs_ec_codewords(blk, ec) for blk in split]
    return out + [e[k] for k in range(ec) for e in ecs]


def _qr_format_bits(mask: int) -> int:
    """Annex C: level M (bits 00) and the mask number, BCH(15,5), masked with 0x5412."""
    rem = mask  # level M's two bits are 00, so the data is the mask number alone
    for _ in range(10):
        rem = (rem << 1) ^ (0x537 if rem >> 9 else 0)
    return (mask << 10 | rem) ^ 0x5412


def _qr_version_bits(version: int) -> int:
    """Annex D: the version (7-40) in 6 bits and its BCH(18,6) check bits."""
    rem = version
    for _ in range(12):
        rem = (rem << 1) ^ (0x1F25 if rem >> 11 else 0)
    return version << 12 | rem


def _qr_penalty(m: list[list[bool]]) -> int:
    """The standard's four mask penalty rules; outside the symbol counts as light."""
    size = len(m)
    rows = ["".join("1" if v else "0" for v in row) for row in m]
    lines = rows + ["".join(col) for col in zip(*rows)]
    score = 0
    for line in lines:
        score += sum(len(run) - 2 for run in re.findall(r"0{5,}|1{5,}", line))  # N1 + extra
        padded = f"0000{line}0000"
        k = padded.find("1011101")  # 1:1:3:1:1 with 4 light modules on either side
        while k >= 0:
            score += 40 if "0000" in (padded[k - 4:k], padded[k + 7:k + 11]) else 0
            k = padded.find("1011101", k + 1)
    nums, inner = [int(row, 2) for row in rows], (1 << (size - 1)) - 1
    for a, b in zip(nums, nums[1:]):  # 2x2 blocks of one colour: a bit per block's column
        same = ~(a ^ a >> 1) & ~(b ^ b >> 1) & ~(a ^ b) & inner
        score += 3 * bin(same).count("1")
    dark = sum(map(sum, m))
    return score + abs(dark * 20 - size * size * 10) // (size * size) * 10


def _qr_format_places(size: int) -> list[tuple[int, int, int]]:
    """(row, column, bit) for both copies of the 15 format bits, bit 0 the lowest: one
    copy around the top-left finder, one split between the other two."""
    first = [(k, 8) for k in range(6)] + [(7, 8), (8, 8), (8, 7)] + \
        [(8, 14 - k) for k in range(9, 15)]
    second = [(8, size - 1 - k) for k in range(8)] + [(size - 15 + k, 8) for k in range(8, 15)]
    return [(r, c, k) for copy in (first, second) for k, (r, c) in enumerate(copy)]


def _qr_function_patterns(version: int) -> tuple[list[list[bool]], list[list[bool]]]:
    """The modules (True is dark) with finders, separators, timing, alignment, the dark
    module and version information drawn and the format areas reserved; and which
    modules those are (never data, never masked)."""
    size = version * 4 + 17
    m = [[False] * size for _ in range(size)]
    fixed = [[False] * size for _ in range(size)]

    def put(r: int, c: int, dark: bool) -> None:
        m[r][c], fixed[r][c] = dark, True

    for k in range(size):  # timing patterns
        put(6, k, k % 2 == 0)
        put(k, 6, k % 2 == 0)
    for r0, c0 in ((3, 3), (3, size - 4), (size - 4, 3)):  # finders with their separators
        for dr in range(-4, 5):
            for dc in range(-4, 5):
                if 0 <= r0 + dr < size and 0 <= c0 + dc < size:
                    put(r0 + dr, c0 + dc, max(abs(dr), abs(dc)) not in (2, 4))
    centres = _qr_alignment(version)
    corners = [(6, 6), (6, size - 7), (size - 7, 6)]  # alignment there would hit a finder
    for r0 in centres:
        for c0 in centres:
            if (r0, c0) not in corners:
                for dr in range(-2, 3):
                    for dc in range(-2, 3):
                        put(r0 + dr, c0 + dc, max(abs(dr), abs(dc)) != 1)
    for r, c, _ in _qr_format_places(size):  # reserved; drawn once the mask is chosen
        put(r, c, False)
    put(size - 8, 8, True)  # the dark module
    if version >= 7:  # version information, bottom-left and top-right
        bits = _qr_version_bits(version)
        for k in range(18):
            a, b = size - 11 + k % 3, k // 3
            put(a, b, bool(bits >> k & 1))
            put(b, a, bool(bits >> k & 1))
    return m, fixed


def _qr_place(m: list[list[bool]], fixed: list[list[bool]], codewords: list[int]) -> None:
    """Codewords' bits, most significant first, up and down two-column strips from the
    right, skipping function modules and column 6; the remainder bits stay light."""
    size = len(m)
    bits = iter([bool(w >> (7 - k) & 1) for w in codewords for k in range(8)])
    for right in range(size - 1, 0, -2):
        right = right if right > 6 else right - 1  # strips left of the timing column shift
        upward = ((right + 1) & 2) == 0
        for step in range(size):
            r = size - 1 - step if upward else step
            for c in (right, right - 1):
                if not fixed[r][c]:
                    m[r][c] = next(bits, False)


def qr_matrix(text: str) -> list[list[bool]]:
    """`text` as a QR code (byte mode, UTF-8, level M, the smallest version): rows of
    modules, True is dark, without the quiet zone.  ValueError past version 40."""
    data = text.encode("utf-8")
    version = next((v for v in range(1, 41)
                    if 4 + (8 if v < 10 else 16) + 8 * len(data) <= _qr_data_codewords(v) * 8),
                   None)
    if version is None:
        raise ValueError(f"too long for a QR code: {len(data)} bytes")
    m, fixed = _qr_function_patterns(version)
    _qr_place(m, fixed, _qr_codeword_sequence(data, version))
    places = _qr_format_places(len(m))
    candidates = []
    for mask, flips in enumerate(QR_MASKS):
        cand = [[v != (not fixed[r][c] and flips(r, c)) for c, v in enumerate(row)]
                for r, row in enumerate(m)]
        format_bits = _qr_format_bits(mask)
        for r, c, k in places:
            cand[r][c] = bool(format_bits >> k & 1)
        candidates.append(cand)
    return min(candidates, key=_qr_penalty)  # on a tie, the lowest mask number


# --- drawing it in a terminal
# Text can only choose which cells get the foreground colour: a block is
# foreground, a space is background.  A code must be dark on light (some
# phone readers will not read a negative), so where colours can be set the
# code is drawn white-on-black explicitly, which is right on every theme.
# Where they cannot (a pipe, NO_COLOR, an old Windows console) the light
# modules are the blocks: right on the dark themes most terminals use, a
# negative on light ones.
QR_BLOCKS = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584",
             (False, False): " "}  # (top light, bottom light) -> full, upper, lower half, none
QR_COLOURS = ("\033[97;40m", "\033[0m")  # bright white on black, then back to normal


def qr_text(text: str, plain: bool = False, colour: bool = False) -> str:
    """`text`'s QR code for a terminal, quiet zone included, light modules drawn: two
    module rows per line in half blocks, or if `plain` one per line as "##" (ASCII)."""
    matrix = qr_matrix(text)
    q, n = QR_QUIET_ZONE, len(matrix)
    size = n + 2 * q
    light = [[not (q <= r < q + n and q <= c < q + n and matrix[r - q][c - q])
              for c in range(size)] for r in range(size)]
    if plain:
        lines = ["".join("##" if v else "  " for v in row) for row in light]
    else:
        light.append([False] * size)  # the odd last row's lower half: background
        lines = ["".join(QR_BLOCKS[top, bottom] for top, bottom in zip(light[r], light[r + 1]))
                 for r in range(0, size, 2)]
    if colour:
        lines = [QR_COLOURS[0] + line + QR_COLOURS[1] for line in lines]
    return "\n".join(lines)


def _can_encode(stream: Any, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeError, LookupError):
        return False
    return True


def print_links(links: list[str], qr: bool, out: Any = None) -> None:
    """Print "Open LINK in a browser" for each link, and with `qr` its QR code below."""
    out = out or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    colour = tty and not os.environ.get("NO_COLOR") and enable_windows_ansi()
    for link in links:
        print(f"Open {link} in a browser", file=out)
        if qr:
            print(qr_text(link, plain=not _can_encode(out, "".join(QR_BLOCKS.values())),
                          colour=colour), file=out)
    out.flush()


# ===========================================================================
# 9. Entry point -- build_parser(), main(argv).  Uses: everything above.
# ===========================================================================

# --- option types
# argparse names a type function in its error when the function raises
# ValueError ("invalid _port value: 'abc'"), so each one here raises
# ArgumentTypeError with a sentence instead; argparse puts "argument --port: "
# in front of it.

def _integer(text: str, low: int, high: int | None, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, None, "a whole number of 1 or more")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, None, "a whole number of 0 or more")


def _port(text: str) -> int:
    """A port to connect to."""
    return _integer(text, 1, 65535, "a port number (1-65535)")


def _listen_port(text: str) -> int:
    """A port to listen on, where 0 asks the system for a free one."""
    return _integer(text, 0, 65535, "a port number between 0 and 65535 (0 picks a free one)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 <= value if zero_ok else 0 < value) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text} is not a number {'of 0 or more' if zero_ok else 'above 0'}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, zero_ok=False)


def _non_negative(text: str) -> float:
    return _number(text, zero_ok=True)


def _any_case(text: str) -> str:
    """For `choices` whose case does not matter: WARNING, Warning and warning alike."""
    return text.lower()


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (not the whole usage block) and a hint,
    and it names the subcommand it is about."""

    _commands: Any = None  # the subparsers action, once add_subparsers has made it

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # argparse hands a subcommand's unknown arguments back to the main parser,
        # whose error would say "pychat.py: error: unrecognized arguments"; the
        # subcommand's own parser says "pychat.py cli: error: ...".
        namespace, extras = super().parse_known_args(args, namespace)
        command = getattr(namespace, "command", None)
        if extras and self._commands is not None and command in self._commands.choices:
            self._commands.choices[command].error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per program part."""
    parser = _Parser(
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
    srv.add_argument("--port", type=_listen_port, default=DEFAULT_PORT,
                     help="TCP port; 0 picks a free one and prints it (default: %(default)s)")
    srv.add_argument("--history", type=_non_negative_int, default=HISTORY_LEN, metavar="N",
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
    srv.add_argument("--rooms", default=LOBBY, metavar="LIST",
                     help="comma-separated rooms that always exist, e.g. \"#lobby,#dev\"; "
                          "others are made by joining and vanish when empty "
                          "(default: %(default)s)")
    srv.add_argument("--password-file", metavar="FILE",
                     help="require the password in FILE's first line to join (or set "
                          "PYCHAT_PASSWORD); never given on the command line, where ps shows it")
    srv.add_argument("--op-password-file", metavar="FILE",
                     help="FILE's first line is the operator password for /op")
    srv.add_argument("--certfile", metavar="PEM", help="serve TLS with this certificate chain")
    srv.add_argument("--keyfile", metavar="PEM",
                     help="the certificate's private key (if not inside --certfile)")
    srv.add_argument("--data-dir", metavar="DIR",
                     help="keep rooms, history, topics and bans in DIR (created if missing) "
                          "across restarts and crashes; rooms with saved messages stay "
                          "when they empty (default: in memory only)")
    srv.add_argument("--fsync", choices=["always", "second", "never"], type=_any_case,
                     default="second",
                     help="with --data-dir: force writes to disk after every message, once "
                          "a second (a power cut loses at most 1 s), or never (the OS "
                          "writes when it chooses) (default: %(default)s)")
    srv.add_argument("--max-log-mb", type=_positive_float, default=MAX_LOG_MB, metavar="MB",
                     help="with --data-dir: a room's log past this size is rewritten as "
                          "its topic and last --history messages (default: %(default)s)")
    srv.add_argument("--max-history-mb", type=_positive_float, default=MAX_HISTORY_MB,
                     metavar="MB", help="memory for all rooms' histories together; past it "
                     "the oldest messages are forgotten first (default: %(default)s)")
    srv.add_argument("--max-rooms-per-address", type=_non_negative_int,
                     default=MAX_ROOMS_PER_ADDRESS, metavar="N",
                     help="rooms that one address may have made at a time; 0: no limit "
                     "(default: %(default)s)")
    srv.add_argument("--max-handshakes", type=_positive_int, default=MAX_HANDSHAKES,
                     metavar="N", help="TLS handshakes in progress at once; more connections "
                     "wait in the kernel's queue (default: %(default)s)")
    srv.add_argument("--repair", action="store_true",
                     help="start even if --data-dir's state.json cannot be read (it is kept "
                     "as state.json.bad-TIME and bans, mutes and ids start afresh)")
    srv.add_argument("--max-clients", type=_non_negative_int, default=MAX_CLIENTS, metavar="N",
                     help="connections accepted at once, 0 for no limit (default: %(default)s)")
    srv.add_argument("--max-per-address", type=_non_negative_int, default=MAX_PER_ADDRESS,
                     metavar="N", help="connections from one address at once, 0 for no limit "
                                       "(default: %(default)s)")
    srv.add_argument("--connect-rate", type=_non_negative, default=CONNECT_RATE, metavar="R",
                     help=f"new connections per second allowed from one address, after a "
                          f"first {CONNECT_BURST} at once; 0 for no limit (default: %(default)s)")
    srv.add_argument("--max-file-size", type=_size, default=MAX_FILE_SIZE, metavar="SIZE",
                     help="largest file relayed, in bytes or with K/M/G; 0 turns file "
                          "transfer off (default: 100M)")
    srv.add_argument("--irc-port", type=_listen_port, default=None, metavar="PORT",
                     help="also listen for IRC clients on PORT (they can use the main port "
                          "too: the first line tells)")
    srv.add_argument("--no-web", action="store_true",
                     help="no web page or WebSocket: an HTTP request on the chat port is "
                          "then taken for IRC, as any line that is not JSON")
    srv.add_argument("--web-port", type=_listen_port, default=None, metavar="PORT",
                     help="also serve the web page and WebSocket on PORT (the chat port "
                          "serves them too: the first line tells)")
    srv.add_argument("--web-origin", action="append", default=[], metavar="ORIGIN",
                     help="a page address besides this server's own that may open a "
                          "WebSocket, such as a reverse proxy's https://chat.example.org "
                          "(repeatable)")
    srv.add_argument("--server-name", default="pychat", metavar="NAME",
                     help="the server's name for IRC clients (default: %(default)s)")
    srv.add_argument("--name", default=None,
                     help="what LAN discovery (`find`, and clients started without --host) "
                          "calls this server (default: this machine's name)")
    srv.add_argument("--no-announce", action="store_true",
                     help=f"do not answer LAN discovery on UDP port {DISCOVERY_PORT}")
    srv.add_argument("--link", metavar="HUB:PORT", action="append", default=[],
                     help="join an IRC network (ngircd) as a leaf server: its users and "
                          "this server's see each other (README: More than one server)")
    srv.add_argument("--link-name", metavar="NAME", default=None,
                     help="this server's name on the network, as the hub's [Server] "
                          "section says, such as pychat.example")
    srv.add_argument("--link-password-file", metavar="FILE",
                     help="the link's password, first line (or set PYCHAT_LINK_PASSWORD); a "
                          "second line is the one the hub sends back, if it differs")
    srv.add_argument("--link-tls", action="store_true", help="link to the hub over TLS")
    srv.add_argument("--link-cafile", metavar="PEM",
                     help="trust this certificate for the hub's TLS (implies --link-tls)")
    srv.add_argument("--max-remote-users", type=_positive_int, default=MAX_REMOTE_USERS,
                     metavar="N", help="people on the network's other servers shown here "
                     f"(default {MAX_REMOTE_USERS:,}; the rest are counted, not shown)")
    srv.add_argument("--qr", action="store_true",
                     help="also print the server's link as a QR code, for phones")
    srv.add_argument("--log-level", default="info", type=_any_case,
                     choices=["debug", "info", "warning", "error"], help="how much to log (default: %(default)s)")
    srv.set_defaults(func=cmd_server)

    find = sub.add_parser("find", help="list the PyChat servers on this network",
                          description="Ask the local network which PyChat servers are there "
                                      f"(UDP port {DISCOVERY_PORT}: IPv4 broadcast and IPv6 "
                                      "multicast), list them and exit; when none answers, "
                                      "say what was tried and the likely causes.")
    find.add_argument("--timeout", type=_positive_float, default=FIND_SECONDS, metavar="S",
                      help="seconds to wait for answers (default: %(default)s)")
    find.add_argument("--at", action="append", default=None, metavar="ADDRESS",
                      help="ask this address (ADDR or ADDR:PORT, e.g. a subnet's broadcast "
                           "address 192.168.2.255) instead of the whole LAN (repeatable)")
    find.add_argument("--json", action="store_true", help="print the servers found as JSON")
    find.set_defaults(func=cmd_find)

    # The clients' TLS flags, shared by cli and gui.
    tls = argparse.ArgumentParser(add_help=False)
    tls.add_argument("--tls", action="store_true",
                     help="connect with TLS, checking the server's certificate")
    tls.add_argument("--cafile", metavar="PEM",
                     help="trust this certificate (e.g. the server's self-signed one); "
                          "implies --tls")
    tls.add_argument("--insecure", action="store_true",
                     help="TLS without checking the certificate (warns; implies --tls)")

    cli = sub.add_parser("cli", help="chat from this terminal (also for scripts)", parents=[tls],
                         description="Join a PyChat server from the terminal. Lines you type are "
                                     "sent; /help lists the commands. With piped input every "
                                     "line is sent and the client exits when input ends.")
    cli.add_argument("--host", default=None,
                     help="server address (default: look on this network, as `find` does; "
                          "if nothing answers, localhost)")
    cli.add_argument("--port", type=_port, default=None,
                     help=f"server port (default: {DEFAULT_PORT}, or the found server's)")
    cli.add_argument("--nick", default=None,
                     help="your nick (default: asked for, or your login name when piped)")
    cli.add_argument("--download-dir", metavar="DIR", default=None,
                     help="where received files go (default: your Downloads folder)")
    cli.add_argument("--auto-accept-max", type=_size, default=None, metavar="SIZE",
                     help="accept offered files up to SIZE bytes without asking (K/M/G "
                          "suffixes: 10M), e.g. for scripts")
    cli.add_argument("--no-history", action="store_true",
                     help="do not show the room's recent messages on joining")
    cli.add_argument("--password-file", metavar="FILE",
                     help="the server password in FILE's first line (or set PYCHAT_PASSWORD; "
                          "otherwise you are asked when the server needs one)")
    cli.add_argument("--connect-attempts", type=_positive_int, default=4, metavar="N",
                     help="tries before giving up on the first connection (default: %(default)s)")
    cli.set_defaults(func=cmd_cli)

    gui = sub.add_parser("gui", help="open the desktop chat window", parents=[tls],
                         description="Open the PyChat window. Without --host, --port and "
                                     "--nick a connect dialog asks, prefilled with the values "
                                     "you used last time.")
    gui.add_argument("--host", default=None, help="server address")
    gui.add_argument("--port", type=_port, default=None, help="server port")
    gui.add_argument("--nick", default=None, help="your nick")
    gui.add_argument("--download-dir", metavar="DIR", default=None,
                     help="where received files go (default: your Downloads folder)")
    gui.set_defaults(func=cmd_gui)

    bench = sub.add_parser("bench", help="measure how many people a server can host",
                           description="Start a PyChat server on 127.0.0.1 (or measure a "
                                       "running one with --host/--port) and load it with "
                                       "simulated clients. Prints a table that ends with "
                                       "how many people this machine can host (or --json).")
    bench.add_argument("--scenario", choices=["fanout", "connections"], type=_any_case,
                       default="fanout",
                       help="fanout: clients in one room, senders send, everyone counts; "
                            "connections: hold idle clients (default: %(default)s)")
    bench.add_argument("--clients", type=_positive_int, nargs="+", default=[100], metavar="N",
                       help="simulated clients; several counts run one after another, "
                            "each with a fresh server, e.g. --clients 50 200 1000 "
                            "(default: 100)")
    bench.add_argument("--senders", type=_positive_int, default=10, metavar="S",
                       help="how many of them send (default: %(default)s)")
    bench.add_argument("--messages", type=_positive_int, default=500, metavar="M",
                       help="messages each sender sends (default: %(default)s)")
    bench.add_argument("--irc", type=_non_negative_int, default=0, metavar="N",
                       help="fanout: N of the receivers join by IRC (the reference server "
                       "gets JSON clients only) (default: %(default)s)")
    bench.add_argument("--ws", type=_non_negative_int, default=0, metavar="N",
                       help="fanout: N of the receivers are browsers, by WebSocket (the "
                       "reference server gets JSON clients only) (default: %(default)s)")
    bench.add_argument("--proto", type=_any_case, nargs="+",
                       choices=("json", "irc", "ws", "mixed"), default=["json"],
                       help="how the clients join: json (PyChat clients; --irc and --ws "
                       "make some receivers IRC or browsers), irc (every client, senders "
                       "too, speaks IRC), ws (the receivers are browsers), or mixed (a "
                       "third of the receivers each); several run one after another, "
                       "e.g. --proto json irc (default: json)")
    bench.add_argument("--against", type=_server, default=None, metavar="HOST:PORT",
                       help="with --proto irc: run the same IRC load against another IRC "
                       "server already running there (such as ngircd; see the README)")
    bench.add_argument("--link", action="store_true",
                       help="also run the load across a network: senders on one PyChat "
                            "server, receivers on another, linked through an ngircd hub "
                            "(needs ngircd)")
    bench.add_argument("--rate", type=_non_negative, default=0.0, metavar="R",
                       help="messages per second per sender; 0: unpaced, each sender keeps "
                            f"{BENCH_WINDOW} messages in flight and sends the next as one "
                            "comes back (default: %(default)s)")
    bench.add_argument("--open-loop", action="store_true",
                       help="fanout: senders never wait for echoes: one message per write, "
                            "at --rate or (rate 0) as fast as they can; latency then "
                            "includes any queue the server lets build up")
    bench.add_argument("--host", default="127.0.0.1",
                       help="with --port: measure this running server instead")
    bench.add_argument("--port", type=_listen_port, default=0,
                       help="a running server's port (default: start one)")
    bench.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="extra argument for the server it starts (repeatable), e.g. "
                            "--server-arg=--max-backlog-bytes=4000000")
    bench.add_argument("--reference", action="store_true",
                       help="also run the same load against a minimal reference server")
    bench.add_argument("--timeout", type=_non_negative, default=60.0, metavar="S",
                       help="give up on a run after this long (default: %(default)s)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--serve-reference", action="store_true", help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)

    ding = sub.add_parser("make-ding", help="write PyChat's notification sound",
                          description="Synthesise the notification chime as a WAV file "
                                      "(this is how ding.wav is made).")
    ding.add_argument("path", nargs="?", default=DING_FILE,
                      help="where to write it (default: %(default)s)")
    ding.set_defaults(func=cmd_make_ding)

    inst = sub.add_parser("install-desktop", help="add PyChat to your applications menu",
                          parents=[tls],
                          description="Create a launcher with PyChat's icon that opens the "
                                      "window (for you only; no root needed): a .desktop entry "
                                      "on Linux, ~/Applications/PyChat.app on macOS, a "
                                      "Start-menu entry on Windows. Run again to update it.")
    inst.add_argument("--server", metavar="HOST:PORT", type=_server,
                      help="connect to this server when the launcher starts PyChat")
    inst.add_argument("--nick", type=_nick, help="the nick the launcher starts PyChat with")
    inst.add_argument("--dry-run", action="store_true", help="only say what would be written")
    inst.set_defaults(func=cmd_install_desktop)
    uninst = sub.add_parser("uninstall-desktop", help="remove what install-desktop created",
                            description="Remove the launcher install-desktop created, and "
                                        "nothing else.")
    uninst.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    uninst.set_defaults(func=cmd_uninstall_desktop)
    return parser


async def serve(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C or SIGTERM; return the exit status."""
    try:
        server = ChatServer(ServerConfig.from_args(args))
    except OSError as e:  # the data directory
        where = f" ({e.filename})" if e.filename else ""
        raise PyChatError(f"cannot use --data-dir {args.data_dir}: {e.strerror or e}"
                          f"{where}") from None
    _raise_open_files((server.cfg.max_clients or MAX_CLIENTS) + 64)
    try:
        port = await server.start(args.host, args.port)
    except OSError as e:
        print(f"pychat: cannot listen on {args.host or '*'}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    if server.link is not None and not await linked(server):
        await server.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: save what is written and go at once
            if server.store is not None:
                server.store.close()
            os._exit(130)
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
    shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.addresses())
    print(f"PyChat {__version__} server listening on {shown} (port {port})", flush=True)
    if args.host in (None, "", "0.0.0.0", "::"):
        lan = lan_addresses()
        where = lan[0] if lan else socket.gethostname() or "<this machine's address>"
    else:
        where = args.host
    tls = f" --cafile {args.certfile}" if args.certfile else ""
    if where.startswith("127.") or where in ("localhost", "::1"):
        print(f"Only this machine can join:  python pychat.py cli --host {where} --port {port}"
              f"{tls}", flush=True)
    else:
        print(f"Friends on your network join with:  python pychat.py cli --host {where} "
              f"--port {port}{tls}   (or: python pychat.py gui ...)", flush=True)
    if server.announce_ports:
        print(f"Clients started without --host find it as \"{server.cfg.name}\" (LAN "
              f"discovery, UDP port {server.announce_ports[0]}; --no-announce turns it off).",
              flush=True)
    if server.cfg.web:  # the links to open in a browser, and with --qr their QR codes
        print_links(web_links(args.host, port, server.cfg.ssl_context is not None), args.qr)
    extras = [name for name, on in (("TLS", server.cfg.ssl_context), ("password",
              server.cfg.password), ("operators", server.cfg.op_password)) if on]
    if extras:
        print(f"Enabled: {', '.join(extras)}.", flush=True)
    if server.cfg.tls_fingerprint:
        print(f"TLS certificate SHA-256: {fingerprint_text(server.cfg.tls_fingerprint)}",
              flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.close()
    return 0


async def linked(server: ChatServer) -> bool:
    """Say how the first try to link to the hub (--link) went: False when
    it shows the configuration is wrong (a password), which retrying
    cannot mend; an unreachable hub is tried again and again."""
    link = server.link
    try:
        why = await asyncio.wait_for(asyncio.shield(link.first), LINK_HANDSHAKE_TIMEOUT + 5)
    except asyncio.TimeoutError:
        why = "no answer from the hub yet"
    host, port = link.address
    if why is None:
        here = server.local_users()
        print(f"Linked to {link.hub} at {host}:{port} as {link.me}: {link.counted()}, "
              f"{counted(here, 'person', 'people')} here.", flush=True)
        return True
    hints = {"password": "", "secure connection required": " (add --link-tls, and give the "
             "hub's [SSL] port)", "not configured": f" (the hub's config has no [Server] "
             f"Name = {link.me}: check --link-name)"}
    hint = next((h for k, h in hints.items() if k in why.lower()), None)
    if hint is not None:
        print(f"pychat: cannot link to {host}:{port}: {why}{hint}", file=sys.stderr)
        return False
    print(f"Not linked yet ({why}); trying again in the background.", flush=True)
    return True


def cmd_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:  # Windows: no signal handlers
        return 0


def cmd_find(args: argparse.Namespace) -> int:
    at = args.at if args.at else find_at_from_env()
    if at == []:
        print("pychat: LAN discovery is off (PYCHAT_FIND_AT=off); give --at ADDRESS",
              file=sys.stderr)
        return 1
    result = find_servers(args.timeout, at=at)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in result.servers], indent=2))
        return 0 if result.servers else 1
    if not result.servers:
        print(result.explain())
        return 1
    print(found_table(result.servers))
    first = result.servers[0]
    # (a found TLS server: plain `cli` looks, asks to trust its certificate, and pins it)
    print("Join: python pychat.py cli" + ("" if first.tls else
                                          f" --host {first.host} --port {first.port}"))
    return 0


def found_table(servers: list[FoundServer]) -> str:
    """The servers `find` lists, one row each (the terminal client shows it too)."""
    rows = [("", "name", "address", "users", "TLS", "password")]
    rows += [(f"{i}.", s.name, s.address, str(s.users), "yes" if s.tls else "no",
              "yes" if s.password else "no") for i, s in enumerate(servers, 1)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"Found {len(servers)} PyChat server{'s' if len(servers) != 1 else ''}:"]
    for r in rows:
        lines.append("  " + "  ".join(cell.rjust(w) if c in (0, 3) else cell.ljust(w)
                                      for c, (cell, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def cli_find_server(args: argparse.Namespace) -> int | None:
    """`cli` without --host: look on the LAN (section 3d) and take the one
    server found, or ask which of several (refuse to guess when piped); when
    none answers, say why and try localhost as before.  Sets args.host and
    args.port (and args.found_tls for a TLS server the user trusts); returns
    an exit status when the client must not go on."""
    at = find_at_from_env()
    if at == []:  # PYCHAT_FIND_AT=off
        args.host = "localhost"
        return None
    print("Looking for PyChat servers on this network...", file=sys.stderr, flush=True)
    result = find_servers(at=at)
    servers = [s for s in result.servers if args.port in (None, s.port)]
    if not servers:
        print(result.explain(), file=sys.stderr)
        print(f"Trying localhost:{args.port or DEFAULT_PORT}.", file=sys.stderr, flush=True)
        args.host = "localhost"
        return None
    chosen = servers[0]
    if len(servers) > 1:
        print(found_table(servers), file=sys.stderr)
        if not sys.stdin.isatty():
            print("pychat: several servers answered; choose one with --host and --port.",
                  file=sys.stderr)
            return 2
        chosen = ask_choice(servers)
        if chosen is None:
            return 1
    print(f'Found "{chosen.name}" at {chosen.address}.', file=sys.stderr, flush=True)
    args.host, args.port = chosen.host, chosen.port
    if chosen.tls and not (args.cafile or args.insecure):
        path = config_dir() / "settings.json"
        settings = load_settings(path)
        args.found_tls = trust_found(chosen, settings, ask_yes_no)
        save_settings(path, settings)
    return None


def ask_choice(servers: list[Any]) -> Any:
    """Which of the listed servers to join (None: gave up)."""
    while True:
        try:
            typed = input(f"Join which one? [1-{len(servers)}]: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return None
        if typed.isdigit() and 1 <= int(typed) <= len(servers):
            return servers[int(typed) - 1]
        print(f"Type a number from 1 to {len(servers)}.", file=sys.stderr)


def ask_yes_no(question: str) -> bool:
    """A yes/no question on the terminal; no when piped or unanswered."""
    print(question, file=sys.stderr)
    if not sys.stdin.isatty():
        print("(not asked: input is not a terminal)", file=sys.stderr)
        return False
    try:
        return input("[y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def ask_nick() -> str | None:
    """Ask for a nick on the terminal until a valid one is typed (None: gave up)."""
    suggestion = default_nick()
    while True:
        try:
            typed = input(f"Nick [{suggestion}]: ").strip() or suggestion
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return None
        problem = nick_problem(typed)
        if problem is None:
            return typed
        print(f"{problem} Try again.", file=sys.stderr)


def cmd_cli(args: argparse.Namespace) -> int:
    if args.nick is not None:
        problem = nick_problem(args.nick)
        if problem:
            print(f"pychat: bad --nick {args.nick!r}: {problem}", file=sys.stderr)
            return 2
    elif sys.stdin.isatty():
        args.nick = ask_nick()  # before asyncio: Ctrl-C here must simply stop
        if args.nick is None:
            return 1
    if args.host is None:
        stop = cli_find_server(args)
        if stop is not None:
            return stop
    args.port = args.port or DEFAULT_PORT
    try:
        return asyncio.run(run_cli(args))
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 0


def cmd_gui(args: argparse.Namespace) -> int:
    if args.nick is not None and nick_problem(args.nick):
        print(f"pychat: bad --nick {args.nick!r}: {nick_problem(args.nick)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args.ssl_context = tls_from_args(args)
    return run_gui(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.serve_reference:
        try:
            asyncio.run(ReferenceServer().serve("127.0.0.1", 0))
        except KeyboardInterrupt:
            pass
        return 0
    if args.scenario == "fanout" and args.senders > min(args.clients):
        print("pychat: --senders cannot be more than --clients", file=sys.stderr)
        return 2
    if args.link and (args.scenario != "fanout" or args.port or args.proto != ["json"]):
        print("pychat: --link runs the fanout on fresh servers, by JSON (no --scenario "
              "connections, --port or --proto)", file=sys.stderr)
        return 2
    if args.against and "irc" not in args.proto:
        print("pychat: --against measures another IRC server: add --proto irc", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(run_bench(args))
    except KeyboardInterrupt:
        print("pychat: bench interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, asyncio.TimeoutError) as e:
        print(f"pychat: bench failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else format_bench(results))
    return 0 if all(r.get("lost", 0) == 0 and not r.get("dropped_clients") for r in results) \
        else 1


def _server(text: str) -> str:
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare.strip() or not (port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536 or any(c in "[] \t" for c in bare) \
            or (":" in bare and bare == host):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 192.168.1.20:5050, "
                                         "or [::1]:5050 for an IPv6 address)")
    return text


def _nick(text: str) -> str:
    problem = nick_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def _desktop_plan(args: argparse.Namespace, python: str, installing: bool
                  ) -> tuple[str, dict[Path, tuple[bytes, bool]], Path]:
    """The system, the launcher's files and the record; ValueError with a
    sentence when no launcher can be made (or, as root, should not be)."""
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no entry in the password database
        raise ValueError("cannot tell where your home folder is; set HOME") from None
    if not home.is_absolute():
        raise ValueError(f"your home folder {str(home)!r} is not an absolute path; fix HOME")
    if installing and hasattr(os, "geteuid") and os.geteuid() == 0 and (
            os.environ.get("SUDO_USER") or os.environ.get("DOAS_USER")
            or os.environ.get("PKEXEC_UID") or _owner(home) not in (0, None)):
        raise ValueError("run this as yourself, not as root (no sudo): the launcher is for "
                         "your own account and needs no administrator rights")
    extra: tuple[str, ...] = ()
    if installing:
        tls_from_args(args)  # a --cafile that is not a certificate fails now, not at each start
        extra = (("--tls",) * args.tls + ("--insecure",) * args.insecure
                 + (("--cafile", os.path.abspath(args.cafile)) if args.cafile else ()))
    system, script = desktop_system(), Path(os.path.abspath(__file__))
    try:
        files = desktop_files(system, home, os.environ, script, python,
                              getattr(args, "server", None), getattr(args, "nick", None), extra)
    except ValueError as e:  # e.g. a folder name that is not valid text
        raise ValueError(f"cannot make a launcher for {script}: {e}") from e
    return system, files, launcher_record(system, home, os.environ)


def cmd_install_desktop(args: argparse.Namespace) -> int:
    if not sys.executable:
        print("pychat: this Python does not know its own path (sys.executable is empty)",
              file=sys.stderr)
        return 2
    try:
        system, files, record = _desktop_plan(args, sys.executable, installing=True)
    except ValueError as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 2
    try:
        install_desktop(files, record, args.dry_run, say=print)
    except ValueError as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pychat: cannot write {e.filename or 'the launcher'}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    if not args.dry_run:
        where = {"darwin": "in ~/Applications, Launchpad and Spotlight",
                 "win32": "in the Start menu"}.get(system, "in your applications menu")
        print(f"PyChat is {where}. Remove it with: python pychat.py uninstall-desktop")
    if system == "win32" and "WindowsApps" in sys.executable:
        print("Note: this is the Microsoft Store Python, which may keep the Start-menu entry "
              "in its private copy of AppData; if PyChat does not show up, install with the "
              "python.org Python instead.")
    return 0


def cmd_uninstall_desktop(args: argparse.Namespace) -> int:
    try:
        _, files, record = _desktop_plan(args, sys.executable or "python", installing=False)
        said = uninstall_desktop(files, record, args.dry_run)
    except ValueError as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pychat: cannot remove {e.filename or 'the launcher'}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print("\n".join(said) if said else "Nothing to remove: PyChat's launcher is not installed.")
    return 0


def cmd_make_ding(args: argparse.Namespace) -> int:
    try:
        path = make_ding(Path(args.path))
    except OSError as e:
        print(f"pychat: cannot write {args.path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a subcommand; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "insecure", False):
        print(f"pychat: {INSECURE_WARNING}", file=sys.stderr)
    try:
        return args.func(args)
    except PyChatError as e:  # the user's to fix: one line, no traceback
        print(f"pychat: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
