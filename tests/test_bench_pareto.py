"""scripts.bench.pareto_speca: merging a companion run into a stored one (--from-json A,B)."""

import json

from scripts.bench.pareto_speca import curve_points, load_results


def _run(path, results):
    path.write_text(json.dumps(dict(args={}, results=results)))
    return str(path)


def _r(curve, label, ideal, psnr):
    return dict(model="flux", curve=curve, label=label, method="speca", ideal=ideal, psnr=psnr)


def test_merge_keeps_order_and_later_run_replaces(tmp_path):
    a = _run(tmp_path / "a.json", [_r("fixed o1", "every:3", 1.96, [50.0]), _r("lite o1", "interval 2", 1.87, [58.0])])
    b = _run(tmp_path / "b.json", [_r("cache-dit o1", "every:3", 1.96, [51.0]), _r("lite o1", "interval 2", 1.87, [59.0])])
    merged = load_results([a, b])
    assert [(r["curve"], r["label"]) for r in merged] == [("fixed o1", "every:3"), ("lite o1", "interval 2"),
                                                          ("cache-dit o1", "every:3")]
    assert merged[1]["psnr"] == [59.0]
    assert list(curve_points(merged, "flux")) == ["fixed o1", "lite o1", "cache-dit o1"]


def test_the_lab_bench_sees_a_file_in_a_full_value_and_in_a_stream_diff():
    """scripts.bench.gpu_lab times /generate off the wire: an update's output is a full value (first and last
    messages) or a diff against the last one (Gradio's stream format); a picture is there when either carries a
    file, and a skipped output or a text diff carries none."""
    from scripts.bench.gpu_lab import _has_file

    picture = {"path": "/tmp/gradio/abc/image.webp", "url": "http://h/file=abc", "meta": {"_type": "gradio.FileData"}}
    assert _has_file(picture)
    assert _has_file([["replace", [], picture]])  # a new picture, as a diff
    assert _has_file([["replace", ["path"], "/tmp/gradio/def/image.jpeg"], ["replace", ["url"], "http://h/def"]])
    assert not _has_file({"__type__": "update"})  # gr.skip()
    assert not _has_file([["append", [], " more text"]])
    assert not _has_file([])
    assert not _has_file(None)
