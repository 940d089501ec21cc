"""Where a `/generate` request's time goes on the server, per lab row of a `scripts.bench.gpu_lab` run: the rows'
client times (gpu_lab.json) against the server timelines (`app-<family>-timeline.jsonl`, written by the app that
`scripts.lab.latency` serves).

    python -m scripts.lab.timeline_table OUT_FOLDER      # after the device call (app-logs.tgz unpacked there)

Columns (seconds from the client's request): the server's generate() starts, the pipeline starts, the pipeline ends,
the update with the image is yielded, the client has the image; then the Python the consumer ran (figure building
per update, ms), picture encodes (count, ms) and Gradio's processing of the updates (ms).
"""

from __future__ import annotations

import json
import os
import sys

from scripts.lab.latency import _server_part


def main(out: str) -> None:
    with open(os.path.join(out, "gpu_lab.json")) as f:
        data = json.load(f)
    head = (f"{'family':6s} {'method':30s} {'steps':>5s} {'gen':>6s} {'pipe0':>6s} {'pipe1':>6s} {'img yld':>7s} "
            f"{'client':>7s} {'yield ms':>8s} {'enc':>4s} {'enc ms':>7s} {'post ms':>8s}")
    print(head)
    for r in data.get("lab", []):
        if r.get("kind") != "lab" or "t0" not in r:
            continue
        tl = os.path.join(out, f"app-{r['family']}-timeline.jsonl")
        if not os.path.isfile(tl):
            continue
        s = _server_part(tl, r["t0"], r["t0"] + r["total_s"])
        f = lambda v, w=6: f"{v:{w}.2f}" if isinstance(v, (int, float)) else " " * (w - 1) + "-"  # noqa: E731
        print(f"{r['family']:6s} {r['method']:30s} {r['steps']:>5} {f(s['generate_start_s'])} {f(s['pipe_start_s'])} "
              f"{f(s['pipe_end_s'])} {f(s['image_yield_s'], 7)} {f(r.get('image_s'), 7)} {s['yield_ms']:8.0f} "
              f"{s['encodes']:4d} {s['encode_ms']:7.0f} {s['postprocess_ms']:8.0f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/out"))
