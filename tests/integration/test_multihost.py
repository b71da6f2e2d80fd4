"""The service on five hosts (network namespaces on one bridge): Redis, the object store, the
gateway and two workers, none sharing a filesystem (shards live in the bucket).

A job over 100 synthetic scenes in ``s3://``; mid-job one worker host is unplugged: its shard
is reclaimed by the other worker and the job finishes; the host is plugged back in and the
returning worker writes nothing twice; then Redis restarts on its host (AOF) and a second job
still runs. Counts are printed: lost 0, duplicated 0.

Runs where network namespaces can be made (root and iproute2, as in CI); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_worker_e2e import FAST_EXTRACTION, tiny_weights
from tests.netns import Hosts, netns_unavailable
from tests.s3_server import S3Server, moto_available

__all__ = ["tiny_weights"]  # fixture used here

_UNAVAILABLE = netns_unavailable() or (None if moto_available() else "needs moto[server], s3fs")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
]

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 100
S3_PORT = 5000
GATEWAY_PORT = 8000


class Cluster:
    """The hosts, their processes, and a way to run Python on any of them."""

    def __init__(self, hosts: Hosts, tmp: Path) -> None:
        self.hosts, self.tmp = hosts, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.s3: S3Server | None = None
        self.ip = {h: hosts.add(h) for h in ("redis", "s3", "gateway", "w1", "w2")}
        self.redis_url = f"redis://{self.ip['redis']}:6379/0"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "AWS_ENDPOINT_URL": f"http://{self.ip['s3']}:{S3_PORT}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "2",
            "REDIS_URL": self.redis_url,
            "BUTD_STORE_URL": "s3://feats/shards",
        }

    def start(self, name: str, host: str, argv: list[str], **env: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (the child holds it)
        self.procs[name] = subprocess.Popen(
            [*self.hosts.exec_argv(host), *argv],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def py(self, host: str, code: str, timeout: float = 60.0) -> Any:
        """Run ``code`` on ``host``; it prints one JSON value last, which is returned."""
        out = subprocess.run(
            [*self.hosts.exec_argv(host), sys.executable, "-c", textwrap.dedent(code)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if out.returncode != 0:
            raise RuntimeError(f"on {host}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start_redis(self) -> None:
        directory = self.tmp / "redis"
        directory.mkdir(exist_ok=True)
        argv = ["redis-server", "--bind", self.ip["redis"], "--port", "6379", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(directory)]
        # No protected mode: the other hosts reach it over the bridge (nothing else can).
        argv += ["--maxmemory-policy", "noeviction", "--protected-mode", "no"]
        self.start("redis", "redis", argv)
        ping = ["redis-cli", "-h", self.ip["redis"], "ping"]
        self.wait(lambda: _ok([*self.hosts.exec_argv("gateway"), *ping]), 20, "redis up")

    def start_worker(self, name: str, weights: Path) -> None:
        store = self.tmp / f"{name}-store"  # its own disk: shards go to the bucket
        env = {
            "BUTD_STORE_DIR": str(store),
            "BUTD_WEIGHTS": str(weights),
            "BUTD_WORKER_ID": name,
            "DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
            "BUTD_EXTRACTION": json.dumps(FAST_EXTRACTION),
            "BATCH_SIZE": "5",
            "CLAIM_IDLE_MS": "4000",
            "BUTD_JANITOR_INTERVAL_S": "0.5",
            "BUTD_IDLE_BLOCK_MS": "200",
            "BUTD_HEARTBEAT_S": "1",
            "BUTD_HEARTBEAT_TTL_S": "3",
            "BUTD_RECONNECT_MAX_S": "0.5",
        }
        self.start(name, name, [sys.executable, "-m", "butd.workers.worker"], **env)

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name != "redis":
                    pytest.fail(f"{name} exited ({proc.returncode}):\n{self.log(name)}")
            try:
                if cond():
                    return
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")

    def live_workers(self) -> list[str]:
        names: list[str] = self.py(
            "gateway",
            """
            import json
            from butd.workers import queue as q
            r = q.connect(__import__("os").environ["REDIS_URL"], socket_timeout=3)
            print(json.dumps(sorted(b.worker_id for b in q.live_workers(r) if b.loaded)))
            """,
        )
        return names

    def http(self, method: str, path: str, body: Any = None) -> Any:
        url = f"http://{self.ip['gateway']}:{GATEWAY_PORT}{path}"
        return self.py(
            "gateway",
            f"""
            import httpx, json
            resp = httpx.request({method!r}, {url!r}, json={body!r}, timeout=20)
            print(json.dumps({{"status": resp.status_code, "body": resp.json()}}))
            """,
        )

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.http("GET", f"/v1/jobs/{job_id}")
        assert reply["status"] == 200, reply
        body: dict[str, Any] = reply["body"]
        return body

    def stop(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    hosts = Hosts()
    c = None
    try:
        c = Cluster(hosts, tmp_path)
        yield c
    finally:
        if c is not None:
            c.stop()
        hosts.close()


SETUP = """
import io, json
import numpy as np
import s3fs
from butd.detector.synth.scenes import SceneParams, render_scene, sample_scene
fs = s3fs.S3FileSystem()
for bucket in ("data", "feats"):
    if not fs.exists(bucket):
        fs.mkdir(bucket)
for i in range({start}, {start} + {n}):
    rng = np.random.default_rng(1000 + i)  # a synthetic scene: shapes on a texture
    image, _ = render_scene(rng, sample_scene(rng, i, SceneParams()))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    fs.pipe(f"data/{prefix}/{{i - {start}:03d}}.jpg", buf.getvalue())
print(json.dumps(len(fs.find("data/{prefix}"))))
"""

COUNTS = """
import collections, json, os
import h5py, s3fs
from butd.store.index import FeatureIndex
from butd.workers import queue as q
r = q.connect(os.environ["REDIS_URL"], socket_timeout=5)
index = FeatureIndex(r)
ids = [f"{{i:03d}}.jpg" for i in range({n})]
shas = [index.lookup_alias("multi", i) for i in ids]
versions = [k.decode()[len("butd:store:loc:"):] for k in r.keys("butd:store:loc:*")]
located = [s for s in shas if s and any(index.lookup_content(v, s) for v in versions)]
fs = s3fs.S3FileSystem()
rows = collections.Counter()
for path in fs.find("feats/shards"):
    with fs.open(path, "rb") as fh, h5py.File(fh, "r") as h5:
        if "content_sha256" in h5:
            rows.update(s.decode() for s in h5["content_sha256"][:])
wanted = {{s for s in shas if s}}
print(json.dumps({{
    "lost": len(ids) - len(located),
    "duplicated": sum(n - 1 for s, n in rows.items() if s in wanted and n > 1),
    "stored_rows": sum(rows[s] for s in wanted),
    "index_entries": sum(r.hlen(f"butd:store:loc:{{v}}") for v in versions),
    "pending": q.pending_count(r),
}}))
"""


def _start(cluster: Cluster, weights: Path) -> None:
    cluster.start_redis()
    cluster.s3 = S3Server(
        cluster.ip["s3"],
        S3_PORT,
        argv_prefix=cluster.hosts.exec_argv("s3"),
        log=cluster.tmp / "s3.log",
    )
    gateway_env = {
        "BUTD_HOST": cluster.ip["gateway"],
        "BUTD_PORT": str(GATEWAY_PORT),
        "BUTD_STORE_DIR": str(cluster.tmp / "gateway-store"),
        "BUTD_ALLOWED_URLS": "s3://data",
        "BUTD_JOB_SHARD_SIZE": "10",
    }
    serve = [sys.executable, "-m", "butd.cli.main", "serve"]
    cluster.start("gateway", "gateway", serve, **gateway_env)
    cluster.start_worker("w1", weights)
    cluster.start_worker("w2", weights)


def _pending_of(cluster: Cluster, consumer: str) -> int:
    n: int = cluster.py(
        "gateway",
        f"""
        import json, os
        from butd.workers import queue as q
        from butd.workers.protocol import GROUP, JOBS_STREAM
        r = q.connect(os.environ["REDIS_URL"], socket_timeout=3)
        mine = [c for c in r.xinfo_consumers(JOBS_STREAM, GROUP) if c["name"] == b"{consumer}"]
        print(json.dumps(mine[0]["pending"] if mine else 0))
        """,
    )
    return n


def test_partition_reclaim_return_and_redis_restart(
    cluster: Cluster, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster
    _start(c, tiny_weights)
    assert c.py("gateway", SETUP.format(n=N_IMAGES, prefix="set", start=0)) == N_IMAGES
    c.wait(lambda: c.live_workers() == ["w1", "w2"], 120, "both workers loaded")
    c.wait(lambda: c.http("GET", "/health/ready")["status"] == 200, 30, "gateway ready")

    created = c.http("POST", "/v1/jobs", {"paths": ["s3://data/set"], "namespace": "multi"})
    assert created["status"] == 201, created
    job_id = created["body"]["job_id"]
    assert created["body"]["total"] == N_IMAGES

    # Mid-job, while w1 holds a shard, unplug w1's host.
    c.wait(lambda: _pending_of(c, "w1") > 0 and c.job(job_id)["done"] >= 10, 120, "w1 busy")
    c.hosts.cut("w1")
    cut_at = time.monotonic()
    # w1 held a shard at the cut: the job can only finish if w2 reclaims it.
    c.wait(lambda: c.job(job_id)["state"] == "done", 180, "job done without w1")
    finished = c.job(job_id)
    took = time.monotonic() - cut_at
    assert (finished["done"], finished["failed"]) == (N_IMAGES, 0), finished
    assert "w1" not in c.live_workers()

    # Plug it back: it comes back, finishes what it had in hand, writes nothing twice.
    c.hosts.restore("w1")
    c.wait(lambda: "w1" in c.live_workers(), 90, "w1 back")
    w1 = c.procs.pop("w1")
    w1.send_signal(signal.SIGTERM)  # drains its batch in hand, then exits 0
    assert w1.wait(timeout=90) == 0, c.log("w1")
    after_return = c.py("gateway", COUNTS.format(n=N_IMAGES), timeout=120)
    assert c.job(job_id)["done"] == N_IMAGES

    # Restart Redis on its host (SIGTERM: the AOF is flushed); the state survives it and the
    # remaining worker reconnects and runs a new job.
    c.procs["redis"].send_signal(signal.SIGTERM)
    c.procs["redis"].wait(timeout=30)
    c.start_redis()
    c.wait(lambda: c.job(job_id)["state"] == "done", 30, "the job's state after the restart")
    c.wait(lambda: c.live_workers() == ["w2"], 60, "w2 reconnected")
    assert c.py("gateway", SETUP.format(n=5, prefix="more", start=N_IMAGES)) == 5
    again = c.http("POST", "/v1/jobs", {"paths": ["s3://data/more"], "namespace": "more"})
    assert again["status"] == 201, again
    c.wait(lambda: c.job(again["body"]["job_id"])["state"] == "done", 120, "job after restart")
    final = c.py("gateway", COUNTS.format(n=N_IMAGES), timeout=120)

    with capsys.disabled():
        print(
            f"\nmulti-host: {N_IMAGES} images, w1 unplugged mid-job; job done {took:.1f}s after "
            f"the cut; after w1 returned: lost {after_return['lost']}, duplicated "
            f"{after_return['duplicated']}; after the Redis restart: lost {final['lost']}, "
            f"duplicated {final['duplicated']} ({final})"
        )
    for counts in (after_return, final):
        assert counts["lost"] == 0 and counts["duplicated"] == 0, counts
        assert counts["stored_rows"] == N_IMAGES
    assert final["index_entries"] == N_IMAGES + 5
