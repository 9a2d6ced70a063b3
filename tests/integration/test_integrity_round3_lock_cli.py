"""Issue 24 item 10 through the CLI: two ``imagen-pipeline download`` runs into one root at once.

The first run fetches from a slow loopback server (a second per image); while it runs, a second
identical command fails at once with one line naming the holder (its pid, its host, the step),
and leaves the first undisturbed. When the first finishes, the lock is free. Before, both ran
into the same folder.
"""

import os
import re
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import lock, storage
from pipeline.layout import RunLayout

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
N_URLS = 12


class Slow(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        time.sleep(1.0)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a_second_concurrent_download_fails_at_once_naming_the_first(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = str(tmp_path / "urls.parquet")
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{i}.png" for i in range(N_URLS)],
                             "caption": [f"image {i}" for i in range(N_URLS)]}), urls)
    root = str(tmp_path / "run")
    raw = RunLayout(root).raw
    cmd = [BIN, "download", "--url-list", urls, "--output", raw, "--preset", "tiny", "--stages", "base64",
           "--threads", "1", "--processes", "1", "--timeout", "5", "--allow-host", f"127.0.0.1:{port}"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    folder = RunLayout(root).locks("raw")
    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not storage.list_files(folder, lock.LEASE_NAME):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run took no lease within 120 s"
            time.sleep(0.2)
        t0 = time.monotonic()
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second was refused: slow its server down"
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"imagen-pipeline download: error: {raw} is in use: another run is running, "
                                   "step download started "), lines[0]
        assert f"by pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert re.search(rf"lease {re.escape(folder)}/[0-9a-f]{{32}}\.json", lines[0]), lines[0]
        assert took < 60, f"the second run took {took:.0f} s to fail"
        # every URL is a slow 404: the first run finishes its download, then says nothing came down
        assert first.wait(timeout=300) == 2, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        server.shutdown()
        server.server_close()
    summary = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
    assert "all 12 URLs failed (http_404 12)" in summary  # the download was whole: every slow 404 counted
    assert not storage.list_files(folder, lock.LEASE_NAME)  # released on exit
    with lock.hold(raw, lock.Holder("download")):  # and free for the next run
        pass
