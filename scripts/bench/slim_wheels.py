"""Repack wheels without what a headless run of the lab never reads, so that the lab travels to a GPU machine
inside the device's 64 MiB limit (tracked tree + carried wheels).

    python -m scripts.bench.slim_wheels SRC_DIR DEST_DIR

Each wheel of SRC_DIR is written to DEST_DIR with the entries below removed, its RECORD rewritten to match, and
entries over 16 KB compressed with LZMA (zipfile's ZIP_LZMA; pip installs such wheels: it reads them with
zipfile), the others with deflate at level 9.
What goes:
- gradio: the browser frontend (templates/frontend, templates/node: 24 MB zipped) and the demo media, changelog
  and test data. The server then answers the API (`gradio_client`, /gradio_api/...) but has no page to show: a
  placeholder index.html says so. Never deploy these wheels for visitors.
- plotly: plotly.js and the JupyterLab extension (the lab sends figures as JSON; the browser brings plotly.js),
  the sample datasets. The figure templates stay.
- pytz: every zone file but UTC (gradio imports pytz for its DateTime component, which the lab does not use).
- diffusers: every pipeline package but FLUX's and HunyuanVideo's (`DIFFUSERS_PIPELINES`).
Other wheels are recompressed only. Prints each wheel's size before and after.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zipfile

PLACEHOLDER = (b"<!doctype html><title>SpecLab (API only)</title><p>This Gradio server was installed from slim wheels "
               b"(scripts/bench/slim_wheels.py): it serves the API for gradio_client, not the page.</p>\n")


def _drop(name: str, path: str) -> bool:
    """Whether entry `path` of wheel `name` (the distribution's name, lower case) is left out."""
    if name == "gradio":
        return (path.startswith(("gradio/templates/", "gradio/media_assets/", "gradio/test_data/"))
                or path == "gradio/CHANGELOG.md")
    if name == "plotly":
        if path.startswith("plotly/package_data/templates/"):
            return False
        return path.startswith(("plotly/package_data/", "plotly/labextension/", "plotly-")) and ".dist-info/" not in path
    if name == "pytz":
        return path.startswith("pytz/zoneinfo/") and path not in ("pytz/zoneinfo/UTC", "pytz/zoneinfo/Etc/UTC")
    if name == "diffusers":
        parts = path.split("/")
        return len(parts) > 3 and parts[1] == "pipelines" and parts[2] not in DIFFUSERS_PIPELINES
    return False


DIFFUSERS_PIPELINES = ("flux", "hunyuan_video")
"""The diffusers pipeline packages kept (the lab's two families); the others (3 MB zipped) are imported lazily by
name, so a run that never names them never misses them."""


def _added(name: str) -> dict[str, bytes]:
    """Entries put in place of what went (folders gradio checks for at start)."""
    if name == "gradio":
        return {"gradio/templates/frontend/index.html": PLACEHOLDER,
                "gradio/templates/frontend/assets/.slim": b"",
                "gradio/templates/frontend/static/.slim": b"",
                "gradio/templates/node/build/.slim": b""}
    return {}


LZMA_FROM = 16384
"""Entries larger than this (bytes) are compressed with LZMA, smaller ones with deflate at level 9."""


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def slim(src: str, dest_dir: str) -> tuple[int, int]:
    base = os.path.basename(src)
    name = re.split(r"-\d", base, maxsplit=1)[0].lower().replace("_", "-")
    dest = os.path.join(dest_dir, base)
    with zipfile.ZipFile(src) as zin:
        entries = [i for i in zin.infolist() if not _drop(name, i.filename) and not i.filename.endswith("/")]
        record = next(i.filename for i in entries if i.filename.endswith(".dist-info/RECORD"))
        files = {i.filename: zin.read(i.filename) for i in entries if i.filename != record}
    files.update(_added(name))
    lines = [_record_line(p, d) for p, d in files.items()] + [f"{record},,"]
    files[record] = ("\n".join(lines) + "\n").encode()
    tmp = dest + ".tmp"
    with zipfile.ZipFile(tmp, "w") as zout:
        for path, data in files.items():  # LZMA pays on large files; its header costs more than it saves on small
            if len(data) > LZMA_FROM:
                zout.writestr(path, data, compress_type=zipfile.ZIP_LZMA)
            else:
                zout.writestr(path, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, dest)
    return os.path.getsize(src), os.path.getsize(dest)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    src_dir, dest_dir = argv
    os.makedirs(dest_dir, exist_ok=True)
    before = after = 0
    for whl in sorted(os.listdir(src_dir)):
        if whl.endswith(".whl"):
            a, b = slim(os.path.join(src_dir, whl), dest_dir)
            before, after = before + a, after + b
            print(f"{whl[:60]:60s} {a / 2**20:7.2f} MiB -> {b / 2**20:6.2f} MiB")
    print(f"{'total':60s} {before / 2**20:7.2f} MiB -> {after / 2**20:6.2f} MiB")


if __name__ == "__main__":
    main()
