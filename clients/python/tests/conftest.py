"""A real broker for the tests: `sluice serve` on a fresh data directory, a port the system
chooses. The binary is $SLUICE_BIN, else the repository's target/release/sluice."""

import os
import pathlib
import signal
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def sluice_bin() -> str:
    path = os.environ.get("SLUICE_BIN") or str(ROOT / "target" / "release" / "sluice")
    if not os.path.exists(path):
        pytest.exit(f"no sluice binary at {path}: run cargo build --release", returncode=2)
    return path


class Broker:
    """A `sluice serve` process; `restart()` stops it and starts it again on the same port and
    data directory."""

    def __init__(self, data_dir: str, extra=(), env=None):
        self.data_dir = data_dir
        self.extra = list(extra)
        self.env = env
        self.port = 0
        self.proc = None
        self.start()

    def start(self):
        listen = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sluice_bin(), "serve", "--data-dir", self.data_dir, "--listen", listen,
             "--http-listen", "", *self.extra],
            stdout=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "warn", **(self.env or {})},
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("sluice listening on "), line
        self.address = line.split()[-1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=60) == 0
        self.proc = None

    def restart(self):
        self.stop()
        self.start()


@pytest.fixture
def broker():
    with tempfile.TemporaryDirectory() as d:
        b = Broker(os.path.join(d, "data"))
        try:
            yield b
        finally:
            b.stop()


@pytest.fixture
def topic(request):
    return "py." + request.node.name.replace("[", ".").replace("]", "").replace("_", "-")[:80]
