"""A local S3 server for tests and benches: moto's server mode on a free loopback port.

Usage::

    with S3Server() as s3:            # started, answers HTTP
        os.environ.update(s3.env())   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... (standard names)
        s3.make_bucket("data")

The server keeps everything in memory and dies with the process.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.redis_proc import free_port


def moto_available() -> bool:
    """True when moto's server mode (``moto[server]``) and s3fs can be imported."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


class S3Server:
    """``python -m moto.server`` bound to ``host:port``, optionally inside a network namespace.

    Args:
        host: listen address (127.0.0.1, or the namespace's own address).
        port: a free one when None.
        argv_prefix: run the server under this command (``ip netns exec NS``).
        log: file for the server's output (discarded when None).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        argv_prefix: tuple[str, ...] = (),
        log: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port()
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        argv = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(self.port)]
        self.proc = subprocess.Popen([*argv_prefix, *argv], stdout=self._log, stderr=self._log)
        self.wait_ready(argv_prefix)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point every S3 client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def wait_ready(self, argv_prefix: tuple[str, ...], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            if self._answers(argv_prefix):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server on {self.url} did not answer within {timeout}s")

    def _answers(self, argv_prefix: tuple[str, ...]) -> bool:
        if argv_prefix:  # probe from inside the namespace
            curl = [
                sys.executable,
                "-c",
                f"import urllib.request; urllib.request.urlopen('{self.url}/', timeout=1)",
            ]
            return subprocess.run([*argv_prefix, *curl], capture_output=True).returncode == 0
        try:
            urllib.request.urlopen(f"{self.url}/", timeout=1).close()
            return True
        except OSError:
            return False

    def make_bucket(self, name: str) -> None:
        """Create a bucket (with the credentials of ``env()``)."""
        import boto3

        boto3.client("s3", endpoint_url=self.url, **_creds()).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _creds() -> dict[str, str]:
    return {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }
