"""Probe the lab's memory and temp files under many short sessions (issue 14).

    python -m scripts.probe_reliability [--sessions 100] [--parallel 4]

Starts the app (`python app.py`) on 127.0.0.1 only, in its own process with its own Gradio temp folder; then
`--sessions` clients each upload the largest trace the server accepts (just under its upload limit, at its
step-record and map-size limits) to `/load_trace`, and leave. Prints the server's RSS and the temp folders'
sizes before, at the peak and after the sessions left, and exits non-zero unless the RSS came back within
100 MB of where it started and the temp folders are no larger than before.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
from gradio_client import Client, handle_file

from lab.limits import Limits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def largest_trace(path: str, limits: Limits) -> int:
    """Write a valid trace of just under `limits.max_upload_mb`, every record with a token map at the map limit
    (up to the record limit); returns its size in bytes."""
    side = int(limits.max_map_cells**0.5)
    rng = random.Random(0)
    row = "[" + ",".join(f"{rng.random():.5f}" for _ in range(side)) + "]"
    grid = "[" + ",".join([row] * side) + "]"
    budget = int(limits.max_upload_mb * 1e6) - 4096
    head = json.dumps({"method": "speca", "config": {"threshold": 7.0}, "model": "FluxTransformer2DModel",
                       "num_steps": 0, "token_grid": [side, side], "overhead": []})[:-1]
    records = []
    size = len(head) + 20
    for i in range(limits.max_trace_records):
        rec = json.dumps({"step": i, "num_steps": 0, "decision": "accepted", "reason": "verified",
                          "error": 0.5, "threshold": 1.0, "time_ms": 1.0, "blocks_computed": 2.0,
                          "blocks_total": 10, "maps": {}})[:-3] + '{"error": ' + grid + "}}"
        if size + len(rec) + 1 > budget:
            break
        records.append(rec)
        size += len(rec) + 1
    text = head.replace('"num_steps": 0', f'"num_steps": {len(records)}') + ', "steps": [' + ",".join(records) + "]}"
    with open(path, "w") as f:
        f.write(text)
    return len(text)


def folder_bytes(paths) -> int:
    total = 0
    for p in paths:
        for dirpath, _, names in os.walk(p):
            for n in names:
                try:
                    total += os.path.getsize(os.path.join(dirpath, n))
                except OSError:
                    pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc, timeout: float = 120) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the app did not come up")


def one_session(url: str, path: str) -> float:
    start = time.perf_counter()
    client = Client(url, verbose=False)
    try:
        summary = client.predict(file=handle_file(path), api_name="/load_trace")[0]
        assert "loaded from" in summary, summary[:200]
    finally:
        client.close()  # the heartbeat ends: Gradio ends the session
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--settle", type=float, default=90.0, help="seconds to wait for the server to clean up")
    ap.add_argument("--ttl", type=float, default=20.0,
                    help="the server's --trace-ttl (session state and Gradio's cached uploads)")
    args = ap.parse_args(argv)

    limits = Limits.from_env()
    work = tempfile.mkdtemp(prefix="probe_reliability_")
    gradio_tmp, server_tmp = os.path.join(work, "gradio"), os.path.join(work, "tmp")
    os.makedirs(gradio_tmp)
    os.makedirs(server_tmp)
    trace_path = os.path.join(work, "largest_trace.json")
    size = largest_trace(trace_path, limits)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_TEMP_DIR=gradio_tmp, TMPDIR=server_tmp, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port),
                             "--trace-ttl", str(args.ttl)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    try:
        wait_up(url, proc)
        server = psutil.Process(proc.pid)
        tmp_before = folder_bytes([gradio_tmp, server_tmp])
        one_session(url, trace_path)  # warm up: imports, first figures; then wait until that session is forgotten
        time.sleep(20)
        rss_start = server.memory_info().rss
        print(f"trace: {size / 1e6:.1f} MB; server RSS at start (after one warm-up session that ended): "
              f"{rss_start / 1e6:.0f} MB; temp folders before: {tmp_before / 1e6:.1f} MB", flush=True)
        peak = rss_start
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(one_session, url, trace_path) for _ in range(args.sessions)]
            for i, f in enumerate(futures, 1):
                f.result()
                peak = max(peak, server.memory_info().rss)
                if i % 20 == 0:
                    print(f"  {i} sessions done, RSS {server.memory_info().rss / 1e6:.0f} MB", flush=True)
        print(f"{args.sessions} sessions in {time.perf_counter() - t0:.0f} s; peak RSS {peak / 1e6:.0f} MB; "
              f"temp folders at the end: {folder_bytes([gradio_tmp, server_tmp]) / 1e6:.1f} MB", flush=True)
        end = time.time() + args.settle
        while True:
            rss, tmp = server.memory_info().rss, folder_bytes([gradio_tmp, server_tmp])
            ok = rss - rss_start <= 100e6 and tmp <= tmp_before
            if ok or time.time() > end:
                break
            time.sleep(2)
        print(f"after the sessions left (+{args.settle - max(0, end - time.time()):.0f} s): RSS {rss / 1e6:.0f} MB "
              f"({(rss - rss_start) / 1e6:+.0f} MB vs start), temp folders {tmp / 1e6:.1f} MB "
              f"(before: {tmp_before / 1e6:.1f} MB) -> {'OK' if ok else 'FAIL'}", flush=True)
        return 0 if ok else 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
