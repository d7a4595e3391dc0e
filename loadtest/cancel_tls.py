"""Cancels inside TLS through pglb's read port, with psycopg 3 and asyncpg (run by
loadtest/cancel-tls, which makes the venv; see loadtest/README.md, "Cancel over TLS").

A PostgreSQL 15 primary and two streaming replicas whose pg_hba.conf accepts clients over TLS
only (hostssl), and three pglb in front of them that differ only in [read]:

    off     balance = "leastconn", tls_affinity = false   (before: the cancel is balanced)
    on      balance = "leastconn", tls_affinity = true    (the default)
    source  balance = "source",    tls_affinity = false

For each client and pglb: a pool of K sessions from 127.0.0.1 over TLS through the read port
(leastconn spreads them over both replicas), then N trials; each runs `pg_sleep(30)` on a
random session of the pool (the others idle, or with --busy running short queries meanwhile), waits
until the server runs it, and cancels it the client's way: psycopg `conn.cancel_safe()`
(libpq's encrypted cancel), asyncpg a query timeout (asyncpg then sends the cancel over TLS).
A cancel "reached" when the server no longer runs the query 2 s later (watched on the server
itself); a missed one is ended with pg_cancel_backend so the next trial starts clean.
"""

import argparse
import asyncio
import random
import importlib.machinery
import importlib.util
import os
import signal
import ssl
import sys
import tempfile
import threading
import time

import asyncpg
import psycopg
from psycopg import errors as pgerrors

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True
# The process, port and PostgreSQL helpers of loadtest/run.
_loader = importlib.machinery.SourceFileLoader("loadtest_run", os.path.join(HERE, "run"))
_spec = importlib.util.spec_from_loader("loadtest_run", _loader)
lt = importlib.util.module_from_spec(_spec)
_loader.exec_module(lt)

HOST = lt.HOST
SLEEP_SQL = "select pg_sleep(30)"
REACH_S = 2.0
# Which session of the pool runs the long query: random (seeded), so that the cancel's turn in
# a balancer's rotation is not tied to the session's (a fixed cycle over the pool would be).
RNG = random.Random(7)

HBA = (
    "local all all trust\n"
    "local replication all trust\n"
    f"host replication {lt.REPL_USER} 127.0.0.1/32 scram-sha-256\n"
    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
)


def make_cert(dir_, run_as):
    crt, key = os.path.join(dir_, "server.crt"), os.path.join(dir_, "server.key")
    lt.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-keyout", key, "-out", crt], "openssl req")
    os.chmod(key, 0o600)
    if run_as:
        import shutil
        for p in (crt, key):
            shutil.chown(p, run_as, run_as)
    return crt, key


class Cluster:
    def __init__(self, root, run_as):
        self.root, self.run_as = root, run_as
        self.primary = lt.PgNode("primary", root, run_as)
        self.replicas = [lt.PgNode("replica1", root, run_as), lt.PgNode("replica2", root, run_as)]

    @property
    def nodes(self):
        return [self.primary] + self.replicas

    def start(self):
        crt, key = make_cert(self.root, self.run_as)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "max_connections": 200,
            "fsync": "off",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "hot_standby": "on",
            "ssl": "on",
            "ssl_cert_file": f"'{crt}'",
            "ssl_key_file": f"'{key}'",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
        }
        lt.on_cleanup("PostgreSQL servers", lambda: [n.stop_now() for n in reversed(self.nodes)])
        lt.log("initdb primary")
        self.primary.initdb(settings)
        with open(os.path.join(self.primary.data, "pg_hba.conf"), "w") as f:
            f.write(HBA)
        self.primary.start(new_port=True)
        p = self.primary
        p.sql(f"CREATE ROLE {lt.REPL_USER} LOGIN REPLICATION PASSWORD '{lt.REPL_PW}'")
        p.sql(f"CREATE ROLE {lt.CHECK_USER} LOGIN PASSWORD '{lt.CHECK_PW}' IN ROLE pg_monitor")
        p.sql(f"CREATE ROLE {lt.APP_USER} LOGIN PASSWORD '{lt.APP_PW}'")
        for r in self.replicas:
            lt.log(f"pg_basebackup {r.name}")
            r.basebackup(p)
            r.start(new_port=True)

    def node(self, port):
        return next(n for n in self.nodes if n.port == port)


class Pglb(lt.Pglb):
    def __init__(self, binary, root, label, backends, read):
        super().__init__(binary, root, label, backends)
        self.read = read

    def config(self):
        be = "".join(f'\n[[backend]]\nname = "{n}"\naddress = "{HOST}:{p}"\n'
                     for n, p in self.backends)
        read = "".join(f"{k} = {v}\n" for k, v in self.read.items())
        return (
            f'[listen]\nwrite = "{HOST}:{self.write_port}"\nread = "{HOST}:{self.read_port}"\n'
            f'stats = "{HOST}:{self.stats_port}"\n\n'
            f'[check]\ninterval = "1s"\ntimeout = "2s"\nrise = 1\nfall = 2\nsslmode = "require"\n'
            f'user = "{lt.CHECK_USER}"\npassword_env = "PGLB_CHECK_PASSWORD"\n'
            f'database = "{lt.DB}"\n\n'
            f'[read]\nfallback_to_primary = false\n{read}{be}'
        )

    def affinity(self):
        """pglb_tls_affinity_total{port="read",rule} from /metrics."""
        import urllib.request
        out = {}
        url = f"http://{HOST}:{self.stats_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('pglb_tls_affinity_total{'):
                    rule = line.split('rule="')[1].split('"')[0]
                    out[rule] = int(float(line.rsplit(" ", 1)[1]))
        return out


def running(cluster, port):
    """Whether the node on `port` runs the long query."""
    n = cluster.node(port)
    q = (f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
         f"AND query = '{SLEEP_SQL}'")
    return int(n.sql(q)) > 0


def wait_running(cluster, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(cluster, port):
            return
        time.sleep(0.02)
    raise lt.Fail("the long query did not start")


def reached(cluster, port, since):
    """True when the query is gone within REACH_S of `since`; else ends it on the server."""
    while time.monotonic() < since + REACH_S:
        if not running(cluster, port):
            return True
        time.sleep(0.02)
    cluster.node(port).sql(
        f"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = '{SLEEP_SQL}'")
    deadline = time.monotonic() + 10
    while running(cluster, port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return False


def dsn(pglb):
    return (f"host=localhost hostaddr={HOST} port={pglb.read_port} user={lt.APP_USER} "
            f"password={lt.APP_PW} dbname={lt.DB} sslmode=require gssencmode=disable")


class Busy:
    """--busy: the other sessions of the pool run short queries meanwhile (threads for psycopg,
    tasks for asyncpg), so requests are in flight on both replicas at the moment of a cancel."""

    def __init__(self):
        self.stop = threading.Event()


def trial_psycopg(cluster, pglb, k, n, busy):
    pool = [psycopg.connect(dsn(pglb), autocommit=True) for _ in range(k)]
    ports = [c.execute("select inet_server_port()").fetchone()[0] for c in pool]
    stop = threading.Event()
    threads = []
    if busy:
        def spin(c):
            while not stop.is_set():
                c.execute("select pg_sleep(0.02)")
        for c in pool[1:]:
            t = threading.Thread(target=spin, args=(c,), daemon=True)
            t.start()
            threads.append(t)
    ok = 0
    try:
        for _ in range(n):
            j = 0 if busy else RNG.randrange(k)
            c, port = pool[j], ports[j]
            errs = []

            def run_long():
                try:
                    c.execute(SLEEP_SQL)
                except pgerrors.QueryCanceled:
                    errs.append("57014")
                except Exception as e:  # noqa: BLE001
                    errs.append(repr(e))
            t = threading.Thread(target=run_long)
            t.start()
            wait_running(cluster, port)
            t0 = time.monotonic()
            c.cancel_safe(timeout=5)
            if reached(cluster, port, t0):
                ok += 1
            t.join(15)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for c in pool:
            c.close()
    return ok, ports


async def trial_asyncpg_async(cluster, pglb, k, n, busy):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pool = await asyncpg.create_pool(host=HOST, port=pglb.read_port, user=lt.APP_USER,
                                     password=lt.APP_PW, database=lt.DB, ssl=ctx,
                                     min_size=k, max_size=k)
    conns = [await pool.acquire() for _ in range(k)]
    ports = [await c.fetchval("select inet_server_port()") for c in conns]
    stop = asyncio.Event()
    spinners = []
    if busy:
        async def spin(c):
            while not stop.is_set():
                await c.execute("select pg_sleep(0.02)")
        spinners = [asyncio.create_task(spin(c)) for c in conns[1:]]
    ok = 0
    loop = asyncio.get_running_loop()
    try:
        for _ in range(n):
            j = 0 if busy else RNG.randrange(k)
            c, port = conns[j], ports[j]
            task = asyncio.create_task(c.execute(SLEEP_SQL))
            await loop.run_in_executor(None, wait_running, cluster, port)
            t0 = time.monotonic()
            # What a query timeout does in asyncpg: the task is cancelled and asyncpg sends
            # a CancelRequest on a new connection, over TLS like the session.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            if await loop.run_in_executor(None, reached, cluster, port, t0):
                ok += 1
            # asyncpg waits for its cancel to finish before the connection is usable again.
            await c.execute("select 1")
    finally:
        stop.set()
        for s in spinners:
            s.cancel()
        await asyncio.gather(*spinners, return_exceptions=True)
        for c in conns:
            await pool.release(c)
        await pool.close()
    return ok, ports


def trial_asyncpg(cluster, pglb, k, n, busy):
    return asyncio.run(trial_asyncpg_async(cluster, pglb, k, n, busy))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="cancels per client and pglb")
    ap.add_argument("--pool", type=int, default=4, help="sessions per pool (K)")
    ap.add_argument("--busy", action="store_true",
                    help="the other sessions run short queries during every cancel")
    ap.add_argument("--only", help="comma-separated pglb labels (off,on,source)")
    ap.add_argument("--check", action="store_true",
                    help="only the pglb where every cancel must arrive (on, source); exit 1 "
                         "if one did not (CI runs this)")
    ap.add_argument("--bench", type=int, metavar="SECONDS",
                    help="instead: SELECT 1 throughput over TLS through the read port, rule off "
                         "vs on (pgbench, 8 clients, 3 interleaved runs of SECONDS each)")
    return ap.parse_args()


def bench(cluster, tmp, binary, seconds):
    """What the affinity bookkeeping costs the splice: pgbench SELECT 1 over TLS, rule off vs
    on, interleaved."""
    backends = [(n.name, n.port) for n in cluster.nodes]
    sql = os.path.join(tmp, "select1.sql")
    with open(sql, "w") as f:
        f.write("SELECT 1;\n")
    pglbs = {label: Pglb(binary, tmp, f"pglb-bench-{label}", backends,
                         {"balance": '"leastconn"', "tls_affinity": v}).start()
             for label, v in (("off", "false"), ("on", "true"))}
    env = dict(os.environ, PGPASSWORD=lt.APP_PW, PGSSLMODE="require", PGGSSENCMODE="disable")
    tps = {label: [] for label in pglbs}
    for _ in range(3):
        for label, p in pglbs.items():
            r = lt.run(["pgbench", "-n", "-f", sql, "-c", "8", "-j", "2", "-T", str(seconds),
                        "-h", HOST, "-p", str(p.read_port), "-U", lt.APP_USER, lt.DB],
                       f"pgbench {label}", env=env, timeout=seconds + 60)
            tps[label].append(float(lt._num(r"tps = ([0-9.]+)", r.stdout)))
    import statistics
    print(f"SELECT 1 over TLS through the read port, 8 clients, {seconds:.0f} s x 3 interleaved")
    for label, xs in tps.items():
        print(f"  tls_affinity = {'true' if label == 'on' else 'false':<5}  median "
              f"{statistics.median(xs):8.0f} tps   runs {', '.join(f'{x:.0f}' for x in xs)}")
    for p in pglbs.values():
        p.stop()


def main():
    args = parse_args()
    run_as = "postgres" if os.geteuid() == 0 else None
    tmp = tempfile.mkdtemp(prefix="pglb-cancel-tls-")
    os.chmod(tmp, 0o755)
    import shutil
    lt.on_cleanup("temp dir", lambda: shutil.rmtree(tmp, ignore_errors=True))
    cluster = Cluster(tmp, run_as)
    cluster.start()
    backends = [(n.name, n.port) for n in cluster.nodes]
    binary = os.environ["PGLB_BIN"]
    if args.bench:
        bench(cluster, tmp, binary, args.bench)
        return
    variants = [
        ("off", {"balance": '"leastconn"', "tls_affinity": "false"}),
        ("on", {"balance": '"leastconn"', "tls_affinity": "true"}),
        ("source", {"balance": '"source"', "tls_affinity": "false"}),
    ]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v[0] in keep]
    if args.check:
        variants = [v for v in variants if v[0] != "off"]
    missed = []
    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), "
          f"asyncpg {asyncpg.__version__}; pool of {args.pool} from {HOST} over TLS, "
          f"{args.trials} cancels each{', others busy' if args.busy else ''}; "
          f"reached = the query ended on its server within {REACH_S:.0f} s")
    print(f"{'pglb [read]':<44} {'client':<9} {'reached':>9}  sessions on  affinity")
    for label, read in variants:
        p = Pglb(binary, tmp, f"pglb-{label}", backends, read).start()
        desc = ", ".join(f"{k} = {v}" for k, v in read.items())
        for client, fn in (("psycopg", trial_psycopg), ("asyncpg", trial_asyncpg)):
            before = p.affinity()
            ok, ports = fn(cluster, p, args.pool, args.trials, args.busy)
            after = p.affinity()
            names = sorted(cluster.node(pt).name for pt in ports)
            diff = {r: after.get(r, 0) - before.get(r, 0) for r in after
                    if after.get(r, 0) != before.get(r, 0)}
            print(f"{desc:<44} {client:<9} {ok:>4}/{args.trials:<4}  "
                  f"{','.join(names)}  {diff or '-'}", flush=True)
            if ok < args.trials:
                missed.append(f"{label}/{client}: {args.trials - ok} of {args.trials}")
        p.stop()
    if args.check and missed:
        raise lt.Fail("cancels that did not reach their query: " + "; ".join(missed))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        code = 130
    except lt.Fail as e:
        lt.log(f"FAILED: {e}")
        code = 1
    finally:
        lt.cleanup()
    sys.exit(code)
