"""Just enough of the PostgreSQL wire protocol (v3) for the load test: a StartupMessage, trust or
SCRAM-SHA-256 login, simple queries, Terminate. Blocking and asyncio flavours, stdlib only.

Used by loadtest/run for what pgbench cannot do: hold thousands of idle sessions open and count,
one by one, the connection attempts that fail while a replica dies.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import socket
import struct

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


class PgError(Exception):
    """An ErrorResponse from the server, or a protocol surprise. `stage` says where it happened:
    connect, startup (login) or query."""

    def __init__(self, stage, message, code=None):
        super().__init__(f"{stage}: {message}" + (f" ({code})" if code else ""))
        self.stage = stage
        self.code = code


def startup_message(user, database, application_name="pglb-loadtest"):
    body = struct.pack("!i", PROTOCOL_3)
    for k, v in (("user", user), ("database", database), ("application_name", application_name)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def message(kind, payload=b""):
    return kind + struct.pack("!i", len(payload) + 4) + payload


def parse_error(payload):
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields.get("M", "error"), fields.get("C")


_SALTED = {}


def _salted_password(password, salt, iterations):
    key = (password, salt, iterations)
    if key not in _SALTED:
        _SALTED[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _SALTED[key]


class Scram:
    """SCRAM-SHA-256 client side (no channel binding). The salted password is cached per
    (salt, iterations): a role's salt never changes, and PBKDF2 would otherwise dominate the
    client's CPU when it opens thousands of sessions."""

    def __init__(self, password):
        self.password = password
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"

    def initial_response(self):
        first = ("n,," + self.client_first_bare).encode()
        return message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)

    def final_response(self, server_first):
        server_first = server_first.decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise PgError("startup", "SCRAM nonce mismatch")
        salted = _salted_password(self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.client_first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return message(b"p", f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


def _md5_response(user, password, salt):
    inner = hashlib.md5((password + user).encode()).hexdigest()
    outer = hashlib.md5(inner.encode() + salt).hexdigest()
    return message(b"p", b"md5" + outer.encode() + b"\0")


class _Login:
    """The login state machine, fed one message at a time; shared by both flavours."""

    def __init__(self, user, password):
        self.user, self.password, self.scram = user, password, None

    def feed(self, kind, payload):
        """Returns (bytes to send or None, done)."""
        if kind == b"E":
            msg, code = parse_error(payload)
            raise PgError("startup", msg, code)
        if kind == b"R":
            code = struct.unpack("!i", payload[:4])[0]
            if code == 0:
                return None, False
            if code == 3:
                return message(b"p", self.password.encode() + b"\0"), False
            if code == 5:
                return _md5_response(self.user, self.password, payload[4:8]), False
            if code == 10:
                if b"SCRAM-SHA-256" not in payload[4:]:
                    raise PgError("startup", "server offers no SCRAM-SHA-256")
                self.scram = Scram(self.password)
                return self.scram.initial_response(), False
            if code == 11:
                return self.scram.final_response(payload[4:]), False
            if code == 12:
                return None, False
            raise PgError("startup", f"unsupported authentication request {code}")
        if kind == b"Z":
            return None, True
        return None, False  # S (ParameterStatus), K (BackendKeyData), N (notice)


# ---------------------------------------------------------------------------------------------
# Blocking
# ---------------------------------------------------------------------------------------------


class Conn:
    """A blocking session. Every call raises PgError with the stage that failed."""

    def __init__(self, host, port, user, password, database="postgres", timeout=10.0):
        self.buf = b""
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise PgError("connect", str(e) or type(e).__name__) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.sendall(startup_message(user, database))
            login = _Login(user, password)
            while True:
                kind, payload = self._read()
                out, done = login.feed(kind, payload)
                if out:
                    self.sock.sendall(out)
                if done:
                    break
        except PgError:
            self.sock.close()
            raise
        except OSError as e:
            self.sock.close()
            raise PgError("startup", str(e) or type(e).__name__) from None

    def _recv_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self):
        header = self._recv_exact(5)
        length = struct.unpack("!i", header[1:])[0]
        return header[:1], self._recv_exact(length - 4)

    def query(self, sql):
        """Simple query; returns the first column of every row (bytes or None)."""
        try:
            self.sock.sendall(message(b"Q", sql.encode() + b"\0"))
            rows, error = [], None
            while True:
                kind, payload = self._read()
                if kind == b"D":
                    n = struct.unpack("!h", payload[:2])[0]
                    if n:
                        ln = struct.unpack("!i", payload[2:6])[0]
                        rows.append(None if ln < 0 else payload[6 : 6 + ln])
                elif kind == b"E":
                    error = parse_error(payload)
                elif kind == b"Z":
                    break
        except OSError as e:
            raise PgError("query", str(e) or type(e).__name__) from None
        if error:
            raise PgError("query", error[0], error[1])
        return rows

    def close(self):
        try:
            self.sock.sendall(message(b"X"))
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------------------------


async def _aread(reader):
    header = await reader.readexactly(5)
    length = struct.unpack("!i", header[1:])[0]
    return header[:1], await reader.readexactly(length - 4)


async def aconnect(host, port, user, password, database="postgres", timeout=30.0):
    """Opens a session and completes its login (ReadyForQuery). Returns (reader, writer)."""

    async def go():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            raise PgError("connect", str(e) or type(e).__name__) from None
        try:
            writer.write(startup_message(user, database))
            login = _Login(user, password)
            while True:
                kind, payload = await _aread(reader)
                out, done = login.feed(kind, payload)
                if out:
                    writer.write(out)
                if done:
                    return reader, writer
        except (OSError, asyncio.IncompleteReadError) as e:
            writer.close()
            raise PgError("startup", str(e) or type(e).__name__) from None
        except PgError:
            writer.close()
            raise

    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        raise PgError("startup", f"no ReadyForQuery within {timeout}s") from None


async def aping(reader, writer):
    """One simple-protocol round trip ("" as the query): sends Q, reads up to ReadyForQuery."""
    writer.write(message(b"Q", b"\0"))
    await writer.drain()
    while True:
        kind, payload = await _aread(reader)
        if kind == b"E":
            raise PgError("query", parse_error(payload))
        if kind == b"Z":
            return


def aclose(writer):
    try:
        writer.write(message(b"X"))
    except Exception:
        pass
    writer.close()
