"""A real S3 API on loopback for the object-storage tests: moto's server (`moto[server]`, from
PyPI), started by the test itself, a stand-in for the cloud's S3. It checks signatures: requests
are signed with keys its IAM issued, and wrong keys are refused as S3 refuses them.

Debian 12's radosgw (Ceph 16.2.15, Pacific) was tried first: it has no standalone database backend
(dbstore came with Ceph 17), so it needs a whole RADOS cluster (monitors, OSDs) to serve a bucket.

Everything reaches the product only through the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`): the code under test has no
notion of this server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.ray_cluster import free_port

# Requests the server answers unsigned: the IAM calls that issue the test's own keys. Every later
# request must be signed with them.
_SETUP_ACTIONS = 3
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    keys: dict = field(default_factory=dict)

    def env(self, **changes: str) -> dict[str, str]:
        """os.environ with this server's endpoint and keys as the standard AWS variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.keys["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": self.keys["SecretAccessKey"], "AWS_DEFAULT_REGION": REGION, **changes})
        return env

    def client(self, **env_changes: str):
        import boto3

        env = self.env(**env_changes)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """key -> {"size", "etag"} of every object under `prefix`."""
        out, s3 = {}, self.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = {"size": o["Size"], "etag": o["ETag"]}
        return out

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        _forget_clients()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _forget_clients() -> None:
    """s3fs keeps one client per set of options for the life of the process: one made for an
    earlier server (another test module's) would still point at that server's port."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def start_s3_server(*, log_path=None) -> S3Server:
    """moto's S3 on 127.0.0.1 with signature checks, and one IAM user allowed s3:* whose keys the
    tests use."""
    import boto3

    _forget_clients()
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS), "MOTO_ALLOW_NONEXISTENT_REGION": "false"}
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint}")
            time.sleep(0.1)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="spp")
    iam.put_user_policy(UserName="spp", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    keys = iam.create_access_key(UserName="spp")["AccessKey"]
    return S3Server(endpoint=endpoint, process=proc, keys={"AccessKeyId": keys["AccessKeyId"], "SecretAccessKey": keys["SecretAccessKey"]})
