#!/usr/bin/env python3
"""A stand-in PostgreSQL backend for the 10,000-idle-session measurement.

Ten thousand real PostgreSQL backends do not fit on the benchmark machine (each is a process of
a few MB), and what a proxy pays per idle session does not depend on what sits behind it once the
session is spliced. So each stub port sits in front of one real server and:

  * relays byte for byte to the real server every session whose StartupMessage names the check
    user (pglb's login check, HAProxy's pgsql-check), so health, role and lag stay real;
  * answers every other session itself: AuthenticationOk, a few ParameterStatus, BackendKeyData,
    ReadyForQuery, then an EmptyQueryResponse + ReadyForQuery to any query, until Terminate.

Usage: stubpg.py CHECK_USER LISTEN_PORT:UPSTREAM_PORT [...]   (127.0.0.1 only)
Prints "ready" on stdout once every port listens.
"""

import asyncio
import resource
import struct
import sys

PARAMS = {
    "server_version": "15.0 (pglb-loadtest stub)",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
}


def msg(kind, payload=b""):
    return kind + struct.pack("!i", len(payload) + 4) + payload


GREETING = (
    msg(b"R", struct.pack("!i", 0))
    + b"".join(msg(b"S", k.encode() + b"\0" + v.encode() + b"\0") for k, v in PARAMS.items())
    + msg(b"K", struct.pack("!ii", 4242, 4242))
    + msg(b"Z", b"I")
)
EMPTY_ANSWER = msg(b"I") + msg(b"Z", b"I")


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def read_packet(reader):
    header = await reader.readexactly(4)
    n = struct.unpack("!i", header)[0]
    return header + await reader.readexactly(n - 4)


async def handle(reader, writer, check_user, upstream_port):
    try:
        packet = await read_packet(reader)
        code = struct.unpack("!i", packet[4:8])[0]
        while code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: decline
            writer.write(b"N")
            packet = await read_packet(reader)
            code = struct.unpack("!i", packet[4:8])[0]
        if code != 196608:
            writer.close()
            return
        parts = packet[8:].split(b"\0")
        params = dict(zip(parts[0::2], parts[1::2]))
        if params.get(b"user", b"").decode() == check_user:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
            up_w.write(packet)
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
            return
        writer.write(GREETING)
        while True:
            header = await reader.readexactly(5)
            n = struct.unpack("!i", header[1:])[0]
            if n > 4:
                await reader.readexactly(n - 4)
            if header[:1] == b"X":
                break
            if header[:1] == b"Q":
                writer.write(EMPTY_ANSWER)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    check_user = sys.argv[1]
    servers = []
    for spec in sys.argv[2:]:
        listen, upstream = (int(x) for x in spec.split(":"))
        servers.append(
            await asyncio.start_server(
                lambda r, w, u=upstream: handle(r, w, check_user, u),
                "127.0.0.1",
                listen,
                backlog=4096,
            )
        )
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
