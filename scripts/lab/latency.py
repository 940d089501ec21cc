"""Where the time between "request sent" and "the client has the image" goes, beyond the bare pipeline call, on a
CPU: the lab served on a FLUX-shaped pipeline folder with random weights (the tiny one `scripts.bench.gpu_lab`
builds: an 8x VAE with 16 latent channels, so 1024² is 64x64 = 4096 image tokens, as FLUX.1-dev's), driven through
`gradio_client` at 1024², against the bare pipeline call with the lab's arguments.

    python -m scripts.lab.latency --out /tmp/latency                 # Full, SpeCa (compare), 6 steps, 1024²
    python -m scripts.lab.latency --out /tmp/latency --steps 10 --methods SpeCa,Full --repeats 2

The server (`serve`, a subprocess; one torch thread) logs a timeline of its side (`server.jsonl`): each update
`Lab.generate` yields (when, and what its figures and images cost Gradio to postprocess), each image Gradio
encodes (format, pixels, bytes, milliseconds). The client records when each update arrives and what it carries.
Printed: per request, the bare call, the time to the first preview and to the image, the total, and the server's
costs added up; written to OUT/latency.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "a large red circle on the left and a small blue square on the right, on a gray background"


def log(*a):
    print(*a, flush=True)


# ---- the server: app.py with a 1024² limit on the folder's CPU preset and a timeline of its costs ----------------
def _instrument(path: str) -> None:
    """Log every yield of `Lab.generate`, every image encode and every postprocess of `/generate`'s updates."""
    import gradio as gr
    from gradio import blocks

    import app
    from lab import runner as R

    lock = threading.Lock()
    out = open(path, "a")

    def emit(**rec):
        rec["t"] = time.time()
        with lock:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    generate = app.Lab.generate

    def timed_generate(self, session=None, **controls):
        emit(ev="generate_start", method=controls.get("method"))
        it = generate(self, session, **controls)
        k = 0
        while True:
            t0 = time.perf_counter()
            try:
                up = next(it)
            except StopIteration:
                emit(ev="generate_end")
                return
            carried = [name for name, v in zip(app.OUTPUTS, up) if not (isinstance(v, dict) and v == gr.skip())]
            emit(ev="yield", k=k, produce_ms=(time.perf_counter() - t0) * 1e3, outputs=carried)
            k += 1
            yield up

    app.Lab.generate = timed_generate

    image_post = gr.Image.postprocess

    def timed_image(self, value):  # Gradio encodes a PIL picture (before PictureFiles)
        t0 = time.perf_counter()
        r = image_post(self, value)
        if hasattr(value, "width") and r is not None:
            emit(ev="image", ms=(time.perf_counter() - t0) * 1e3, encoded=True, format=self.format,
                 pixels=value.width * value.height, bytes=os.path.getsize(r.path))
        return r

    gr.Image.postprocess = timed_image
    if hasattr(app, "PictureFiles"):  # the lab encodes its pictures once (app.PictureFiles)
        picture_file = app.PictureFiles.file

        def timed_file(self, picture, fmt):
            t0, before = time.perf_counter(), self.encodes
            path = picture_file(self, picture, fmt)
            emit(ev="image", ms=(time.perf_counter() - t0) * 1e3, encoded=self.encodes > before, format=fmt,
                 pixels=picture.width * picture.height, bytes=os.path.getsize(path))
            return path

        app.PictureFiles.file = timed_file

    run_work = R._Run._work

    def timed_work(self):
        emit(ev="pipe_start")
        try:
            run_work(self)
        finally:
            emit(ev="pipe_end")

    R._Run._work = timed_work

    post = blocks.Blocks.postprocess_data

    async def timed_post(self, block_fn, predictions, state):
        t0 = time.perf_counter()
        r = await post(self, block_fn, predictions, state)
        if getattr(block_fn, "api_name", None) == "generate":
            sizes = {}
            for blk, v in zip(block_fn.outputs, r):
                if isinstance(blk, gr.Plot) and isinstance(v, dict) and isinstance(v.get("plot"), str):
                    sizes[getattr(blk, "elem_id", "") or "plot"] = len(v["plot"])
            emit(ev="postprocess", ms=(time.perf_counter() - t0) * 1e3, plot_chars=sizes)
        return r

    blocks.Blocks.postprocess_data = timed_post


def cmd_serve(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timeline:
        _instrument(args.timeline)
    import logging

    import app
    from lab import models as M
    from lab.limits import Limits

    from lab.session import release_large_blocks_at_once

    logging.basicConfig(level=logging.WARNING)
    (name,) = M.add_folder_presets([args.folder])
    M.PRESETS[name] = dataclasses.replace(M.PRESETS[name], max_size=max(args.max_size, M.PRESETS[name].max_size))
    release_large_blocks_at_once()  # as app.main
    limits = Limits.from_env(max_work=args.max_work)
    demo = app.build_app(app.Lab(manager=M.ModelManager(), limits=limits, gpu=app.GPU))
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name="127.0.0.1", server_port=args.port, show_error=False, prevent_thread_lock=False,
                **app.page_options())


# ---- the bare call -------------------------------------------------------------------------------------------------
def bare_seconds(folder: str, method: str, steps: int, size: int, repeats: int, threads: int) -> list[float]:
    """Wall seconds of the bare pipeline call with the lab's arguments and config (a fresh `accel.apply` inside
    the timing, as each lab request has), after one untimed call."""
    import torch

    import accel
    from lab import methods as LM
    from lab import runner as R

    torch.set_num_threads(threads)
    model = _bare_model(folder)
    spec = R.RunSpec(model.preset.name, PROMPT, 0, steps, size, size, model.preset.guidance)
    cfg = LM.by_label(method).build({})
    out = []
    for k in range(repeats + 1):
        kw = R.pipe_kwargs(spec, model)
        t0 = time.perf_counter()
        with accel.apply(model.pipe, cfg):
            model.pipe(**kw)
        if k:
            out.append(time.perf_counter() - t0)
    return out


_MODELS: dict = {}


def _bare_model(folder):
    from lab import models as M

    if folder not in _MODELS:
        (name,) = M.add_folder_presets([folder])
        _MODELS[folder] = M.ModelManager().get(name)
        _MODELS[folder].pipe.set_progress_bar_config(disable=True)
    return _MODELS[folder]


# ---- the client ------------------------------------------------------------------------------------------------------
def request(client, **controls) -> dict:
    import app
    from scripts.bench.gpu_lab import _is_file

    t0 = time.time()
    job = client.submit(api_name="/generate", **controls)
    ups = []
    for up in job:
        files = [k for k, v in zip(app.OUTPUTS, up) if _is_file(v) or (isinstance(v, (list, tuple)) and v
                                                                        and all(_is_file(x) for x in v))]
        ups.append(dict(t=time.time() - t0, files=files))
    first_preview = next((u["t"] for u in ups if "preview" in u["files"]), None)
    image = next((u["t"] for u in ups if "image" in u["files"]), None)
    return dict(t0=t0, first_preview_s=first_preview, image_s=image, total_s=time.time() - t0, updates=ups)


def _server_part(timeline: str, t0: float, t1: float) -> dict:
    """The server's records between t0 and t1, added up."""
    with open(timeline) as f:
        every = [json.loads(line) for line in f]
    # this request's records: from its generate_start (the first after t0, less 0.5 s: the client notes t0 after
    # the previous request's end, and the server may start first) to the next request's
    first = next((i for i, r in enumerate(every) if r["ev"] == "generate_start" and r["t"] >= t0 - 0.5), None)
    recs = []
    for r in every[first:] if first is not None else []:
        if recs and r["ev"] == "generate_start" or r["t"] > t1 + 0.5:
            break
        recs.append(r)
    enc = [r for r in recs if r["ev"] == "image" and r["encoded"]]
    imgs = [r for r in recs if r["ev"] == "image"]
    pipe_start = next((r["t"] - t0 for r in recs if r["ev"] == "pipe_start"), None)
    pipe_end = next((r["t"] - t0 for r in recs if r["ev"] == "pipe_end"), None)
    posts = [r for r in recs if r["ev"] == "postprocess"]
    ys = [r for r in recs if r["ev"] == "yield"]
    start = next((r["t"] - t0 for r in recs if r["ev"] == "generate_start"), None)
    # the update with the method's image: the first to set "image" once the pipeline ended (a run's first update
    # sets it too, to None: it clears the last run's picture)
    image_yield = next((r["t"] - t0 for r in ys if "image" in r["outputs"]
                        and (pipe_end is None or r["t"] - t0 >= pipe_end)), None)
    return dict(generate_start_s=start, pipe_start_s=pipe_start, pipe_end_s=pipe_end, yields=len(ys),
                image_yield_s=image_yield, image_posts=len(imgs), image_post_ms=sum(r["ms"] for r in imgs),
                encodes=len(enc), encode_ms=sum(r["ms"] for r in enc), encode_mpix=sum(r["pixels"] for r in enc) / 1e6,
                encode_kb=sum(r["bytes"] for r in enc) / 1e3,
                encode_formats=sorted({f"{r['format']}:{r['pixels']}" for r in enc}),
                postprocess_ms=sum(r["ms"] for r in posts),
                plot_kchars=sum(sum(r["plot_chars"].values()) for r in posts) / 1e3,
                yield_ms=sum(r["produce_ms"] for r in ys))


def cmd_run(args) -> None:
    from scripts.bench.gpu_lab import _connect

    os.makedirs(args.out, exist_ok=True)
    folder = args.folder or os.path.join(args.out, "flux-random")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        import torch

        from scripts.bench.gpu_lab import build_flux

        with torch.no_grad():
            build_flux(folder, True, "cpu", torch.float32)
        log(f"built {folder}")
    timeline = os.path.join(args.out, "server.jsonl")
    open(timeline, "w").close()
    cmd = [sys.executable, "-m", "scripts.lab.latency", "serve", "--folder", folder, "--port", str(args.port),
           "--max-size", str(args.size), "--threads", str(args.threads), "--timeline", timeline]
    logf = open(os.path.join(args.out, "server.log"), "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rows = []
    try:
        client = _connect(f"http://127.0.0.1:{args.port}/", server, 120.0)
        base = dict(prompt=PROMPT, seed=0, width=args.size, height=args.size)
        request(client, method="Full", steps=2, compare=False, **base)  # loads the folder
        methods = args.methods.split(",")
        for m in methods:  # first-call costs
            request(client, method=m, steps=2, compare=False, **base)
        for rep in range(args.repeats):
            for m in methods:
                compare = m != "Full" and not args.no_compare
                r = request(client, method=m, steps=args.steps, compare=compare, **base)
                r.update(method=m, steps=args.steps, compare=compare, repeat=rep)
                time.sleep(0.3)
                r["server"] = _server_part(timeline, r["t0"], r["t0"] + r["total_s"])
                rows.append(r)
                s = r["server"]
                log(f"{m:10s} {'compare' if compare else '':7s} preview {r['first_preview_s'] or -1:6.2f} s  "
                    f"image {r['image_s'] or -1:6.2f} s  total {r['total_s']:6.2f} s  updates {len(r['updates']):3d}  "
                    f"| server: pipeline {s['pipe_start_s'] or -1:.2f}-{s['pipe_end_s'] or -1:.2f} s, image yielded "
                    f"{s['image_yield_s'] or -1:.2f} s (client +{(r['image_s'] or 0) - (s['pipe_end_s'] or 0):.2f} s "
                    f"after the pipeline), "
                    f"{s['encodes']} encodes {s['encode_mpix']:.1f} Mpx {s['encode_kb']:.0f} kB {s['encode_ms']:.0f} ms, "
                    f"postprocess {s['postprocess_ms']:.0f} ms, plots {s['plot_kchars']:.0f} kchars, "
                    f"generator {s['yield_ms']:.0f} ms")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        logf.close()
    bare = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        bare[m] = bare_seconds(folder, m, args.steps, args.size, args.repeats, args.threads)
        log(f"bare {m}: {', '.join(f'{b:.2f}' for b in bare[m])} s")
    log("")
    log(f"{'method':10s} {'image s':>8s} {'bare s':>7s} {'over s':>7s} {'over %':>7s} {'preview s':>9s} {'total s':>8s}")
    for m in bare:
        mine = [r for r in rows if r["method"] == m]
        img = statistics.median(r["image_s"] for r in mine)
        b = statistics.median(bare[m])
        prev = statistics.median(r["first_preview_s"] or float("nan") for r in mine)
        log(f"{m:10s} {img:8.2f} {b:7.2f} {img - b:7.2f} {100 * (img - b) / b:6.1f}% {prev:9.2f} "
            f"{statistics.median(r['total_s'] for r in mine):8.2f}")
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump(dict(rows=rows, bare=bare, args=vars(args)), f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.lab.latency", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--folder", required=True)
    s.add_argument("--port", type=int, default=7870)
    s.add_argument("--max-size", type=int, default=1024, help="raise the folder preset's largest size to this")
    s.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    s.add_argument("--max-work", type=float, default=1e6)
    s.add_argument("--timeline", default=None)
    ap.add_argument("--out", default="/tmp/latency")
    ap.add_argument("--folder", default=None, help="a FLUX pipeline folder (default: build the tiny random one)")
    ap.add_argument("--port", type=int, default=7870)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", default="Full,SpeCa")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compare", action="store_true")
    args = ap.parse_args(argv)
    (cmd_serve if args.cmd == "serve" else cmd_run)(args)


if __name__ == "__main__":
    main()
