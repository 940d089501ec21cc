"""A real browser against the running lab: Debian's chromium driven by Playwright (no `playwright install`).

Skips only when chromium or the playwright package is truly missing, and fails instead when
SPECLAB_REQUIRE_BROWSER=1 or CI is set (CI installs chromium: scripts/setup_env.sh --test).
Screenshots go to a temp dir; set SPECLAB_SCREENSHOTS=/some/dir to keep copies.
"""

import os
import shutil
import socket
import time

import pytest

import app
import tiny
from lab import models as M

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if p and os.access(p, os.X_OK):
            return p
    return None


def _require_or_skip(reason: str):
    if os.environ.get("SPECLAB_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(f"browser test required here but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        _require_or_skip("chromium is not installed (apt-get update && apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require_or_skip("the playwright python package is not installed (pip install -r requirements-test.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    bundled = os.path.isfile(os.path.join(M.TINY_FLUX_DIR, "model_index.json"))
    if bundled and not os.environ.get("SPECLAB_TEST_RANDOM_PIPE"):
        manager = M.ModelManager()
    else:  # the random test pipe; slowed to >= 30 ms a step so that a run is still going when Stop comes
        def factory(preset):
            pipe = tiny.tiny_flux_pipe()
            pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.03))
            return pipe

        manager = M.ModelManager(factory=factory)
    demo = app.build_app(app.Lab(manager, every_s=0.3))
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.page_options())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _shot(page, tmp_path, name, full_page=True):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    keep = os.environ.get("SPECLAB_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, name))
    assert path.stat().st_size > 10_000
    return path


def _wait_loaded(page) -> None:
    """The page's load event filled the size controls with the preset's values (and the example's panels)."""
    page.wait_for_function(
        "() => { const e = document.querySelector('#speclab-steps input[type=number]'); "
        "const s = document.querySelector('#speclab-summary'); "
        "return e && e.value && s && !s.innerText.includes('No run yet'); }", timeout=30_000)


def _set_steps(page, n: int) -> None:
    """Type `n` into the steps box, as a user would, and wait until the slider took it."""
    _wait_loaded(page)
    box = page.locator("#speclab-steps input[type=number]")
    box.fill(str(n))
    box.press("Enter")
    page.wait_for_function(
        f"() => document.querySelector('#speclab-steps input[type=range]').value === '{n}'", timeout=10_000)


def _generate_and_wait(page, steps: int) -> None:
    """Click Generate; wait until the summary shows the finished, compared run, or fail at once on an error toast."""
    page.locator("#speclab-generate").click()
    page.wait_for_function(
        "() => { const s = document.querySelector('#speclab-summary'); "
        f"return (s && s.innerText.includes('step {steps}/{steps}') && s.innerText.includes('PSNR')) "
        "|| document.querySelector('.toast-body, [data-testid=\"toast-body\"]'); }",
        timeout=120_000,
    )
    toast = page.locator(".toast-body, [data-testid='toast-body']")
    assert toast.count() == 0, f"the app reported an error: {toast.first.inner_text()}"


def test_generate_in_a_real_browser(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server, wait_until="domcontentloaded", timeout=60_000)
        page.locator("#speclab-generate").wait_for(timeout=60_000)
        _set_steps(page, 12)  # set a slider through its number box, as a user typing
        # method switch hides the other method's controls
        page.get_by_label("SpecDiff").check() if page.get_by_label("SpecDiff").count() else None
        # wait for the round trip (a fixed 300 ms pause failed on a loaded 2-core machine); fails after 10 s
        page.get_by_text("threshold base").wait_for(state="hidden", timeout=10_000)
        assert not page.get_by_text("threshold base").is_visible()
        page.get_by_label("SpeCa", exact=True).check()
        page.get_by_text("threshold base").wait_for(state="visible", timeout=10_000)

        _generate_and_wait(page, 12)
        for pid in ("speclab-error", "speclab-timeline", "speclab-maps", "speclab-diff"):
            page.locator(f"#{pid} .js-plotly-plot").first.wait_for(timeout=30_000)
        # the error plot has markers, the timeline has bars, the maps have a heatmap
        assert page.locator("#speclab-error .scatterlayer .point").count() >= 12
        assert page.locator("#speclab-timeline .barlayer .point").count() >= 12
        assert page.locator("#speclab-maps .heatmaplayer image, #speclab-maps .hm image").count() >= 1
        assert page.locator("#speclab-image img").count() == 1
        assert page.locator("#speclab-full img").count() == 1
        shot = _shot(page, tmp_path, "lab_after_run.png")
        assert shot.exists()
        # scrub the token maps to another step
        title = page.locator("#speclab-maps .gtitle").first
        before = title.text_content()
        box = page.locator("#speclab-step input[type=number]")
        lo = int(page.locator("#speclab-step input[type=range]").get_attribute("min"))
        box.fill(str(lo))
        box.press("Enter")
        page.wait_for_function(
            "t => { const e = document.querySelector('#speclab-maps .gtitle'); return e && e.textContent !== t; }",
            arg=before, timeout=30_000)
        assert f"step {lo}" in title.text_content()
    finally:
        page.close()


def test_stop_button_ends_a_run(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server, wait_until="domcontentloaded", timeout=60_000)
        page.locator("#speclab-generate").wait_for(timeout=60_000)
        _wait_loaded(page)
        for box, value in (("#speclab-steps", "100"), ("#speclab-width", "256"), ("#speclab-height", "256")):
            field = page.locator(f"{box} input[type=number]")  # a long run, so that Stop comes mid-way
            field.fill(value)
            field.press("Enter")
        # Full computes every step: a SpeCa run of 100 steps could end before the Stop lands on a loaded machine
        page.get_by_label("Full", exact=True).check()
        page.get_by_text("threshold base").wait_for(state="hidden", timeout=10_000)
        page.locator("#speclab-generate").click()
        try:
            page.wait_for_function(
                "() => document.querySelector('#speclab-summary').innerText.includes('running')", timeout=60_000)
            page.locator("#speclab-stop").click()
            page.wait_for_function(
                "() => document.querySelector('#speclab-summary').innerText.includes('stopped')", timeout=60_000)
        except Exception:
            _shot(page, tmp_path, "lab_stop_failed.png")
            raise AssertionError("no stopped run; summary: " + page.locator("#speclab-summary").inner_text())
        text = page.locator("#speclab-summary").inner_text()
        done = int(text.split("— step ")[1].split("/")[0])
        assert 0 < done < 100, text
        _shot(page, tmp_path, "lab_stopped.png")
    finally:
        page.close()


def test_bundled_video_preset_in_a_real_browser(browser, server, tmp_path):
    """Pick the bundled tiny HunyuanVideo in the dropdown, Generate: an mp4 plays in the video panel, the per-step
    panels render, and the token maps get their frame slider."""
    if not os.path.isfile(os.path.join(M.TINY_VIDEO_DIR, "model_index.json")) or os.environ.get(
            "SPECLAB_TEST_RANDOM_PIPE"):
        pytest.skip("the server runs the random test pipe, not the bundled models")
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(server, wait_until="domcontentloaded", timeout=60_000)
        page.locator("#speclab-generate").wait_for(timeout=60_000)
        page.locator("#speclab-model input").click()
        page.get_by_role("option", name=M.TINY_VIDEO).click()
        page.locator("#speclab-frames").wait_for(state="visible", timeout=30_000)
        page.locator("#speclab-video").wait_for(state="visible", timeout=30_000)
        _set_steps(page, 8)
        _generate_and_wait(page, 8)
        video = page.locator("#speclab-video video")
        video.wait_for(timeout=30_000)
        assert ".mp4" in (video.get_attribute("src") or "")
        for pid in ("speclab-error", "speclab-timeline", "speclab-maps"):
            page.locator(f"#{pid} .js-plotly-plot").first.wait_for(timeout=30_000)
        page.locator("#speclab-frame").wait_for(state="visible", timeout=30_000)
        assert "frame" in page.locator("#speclab-maps .gtitle").first.text_content()
        _shot(page, tmp_path, "lab_video_after_run.png")
    finally:
        page.close()


def _open(page, server, width=1440, height=900):
    page.set_viewport_size({"width": width, "height": height})
    page.goto(server, wait_until="domcontentloaded", timeout=60_000)
    page.locator("#speclab-generate").wait_for(timeout=60_000)
    _wait_loaded(page)


def _small_run(page, steps=6, size=64):
    _set_steps(page, steps)
    for box in ("#speclab-width", "#speclab-height"):
        field = page.locator(f"{box} input[type=number]")
        field.fill(str(size))
        field.press("Enter")


def _in_view(page, selector) -> bool:
    return page.evaluate(
        "s => { const r = document.querySelector(s).getBoundingClientRect(); "
        "return r.top >= 0 && r.bottom <= window.innerHeight && r.height > 0; }", selector)


def test_generate_and_image_stay_in_view_while_a_run_streams(browser, server, tmp_path):
    """1440x900: press Generate and watch: both the button and the image are on screen while the run streams,
    the summary explains the numbers (ideal = compute, measured = back-to-back timing)."""
    page = browser.new_page()
    try:
        _open(page, server)
        _set_steps(page, 20)
        page.locator("#speclab-generate").click()
        page.wait_for_function(
            "() => document.querySelector('#speclab-summary').innerText.match(/running|timing/)", timeout=60_000)
        assert page.evaluate("() => window.scrollY") == 0
        assert _in_view(page, "#speclab-generate") and _in_view(page, "#speclab-image")
        assert _in_view(page, "#speclab-preview")
        page.wait_for_function(
            "() => document.querySelector('#speclab-summary').innerText.includes('PSNR')", timeout=120_000)
        text = page.locator("#speclab-summary").inner_text()
        assert "ideal speedup (compute, not time)" in text and "back-to-back" in text
        assert "SpeCa on tiny FLUX" in text.replace("*", "")
        _shot(page, tmp_path, "lab-desktop.png", full_page=False)  # what a visitor sees: docs/screenshots/
    finally:
        page.close()


def test_explanation_and_knob_help_are_visible(browser, server):
    page = browser.new_page()
    try:
        _open(page, server)
        how = page.locator("#speclab-how")
        assert how.is_visible() and "forecast" in how.inner_text().lower()
        assert page.locator("#speclab-how a[href*='2509.11628']").count() == 1
        assert page.get_by_text("The threshold at step i of n").first.is_visible()
        page.get_by_label("SpecDiff").check()
        page.wait_for_function(
            "() => document.querySelector('#speclab-how a[href*=\"2509.13848\"]')", timeout=10_000)
        for key in ("maps", "timeline", "error", "diff"):
            assert page.locator(f"#speclab-caption-{key}").is_visible()
    finally:
        page.close()


def test_phone_shows_prompt_generate_and_image_first(browser, server, tmp_path):
    page = browser.new_page()
    try:
        _open(page, server, 390, 844)
        assert _in_view(page, "#speclab-prompt") and _in_view(page, "#speclab-generate")
        top = page.evaluate("() => document.querySelector('#speclab-image').getBoundingClientRect().top")
        knobs = page.evaluate("() => document.querySelector('#speclab-method').getBoundingClientRect().top")
        assert top < knobs and top < 844, (top, knobs)
        _shot(page, tmp_path, "lab-phone.png", full_page=False)
    finally:
        page.close()


def _record(page, selector: str, expression: str, name: str) -> None:
    """Collect, in the page, every value `expression` (JS, on the element `el`) takes while `selector`'s element
    changes, into the set window[name]: a condition to wait for, however slow the machine."""
    page.evaluate(
        """([sel, expr, name]) => { const el = document.querySelector(sel); const seen = window[name] = new Set();
           const read = new Function('el', 'return ' + expr);
           const note = () => { try { seen.add(String(read(el))); } catch (e) {} };
           note(); new MutationObserver(note).observe(el, {subtree: true, childList: true, characterData: true,
                                                            attributes: true}); }""", [selector, expression, name])


def test_play_animates_the_panels(browser, server):
    """Play after a run: the token maps' title goes through several steps and the timeline grows bar by bar
    (several bar counts seen), ending on the whole run with the step slider at the last verified step."""
    page = browser.new_page()
    try:
        _open(page, server)
        _small_run(page, 10)
        _generate_and_wait(page, 10)
        bars = "#speclab-timeline .barlayer .point"
        final_bars = page.locator(bars).count()
        _record(page, "#speclab-maps", "(el.querySelector('.gtitle') || {}).textContent", "speclabTitles")
        _record(page, "#speclab-timeline", f"el.querySelectorAll('.barlayer .point').length", "speclabBars")
        page.locator("#speclab-play").click()
        page.wait_for_function("() => window.speclabTitles.size >= 4 && window.speclabBars.size >= 4",
                               timeout=120_000)
        page.wait_for_function(f"n => document.querySelectorAll('{bars}').length === n", arg=final_bars,
                               timeout=60_000)
        last = page.locator("#speclab-step input[type=range]").get_attribute("max")
        page.wait_for_function(
            "v => document.querySelector('#speclab-step input[type=number]').value === v", arg=last, timeout=60_000)
        assert f"step {last}" in page.locator("#speclab-maps .gtitle").first.text_content()
    finally:
        page.close()


def _sweep(page, count: int) -> None:
    page.get_by_text("Sweep: this method's speed/quality curve").click()
    box = page.locator("#speclab-sweep-count input[type=number]")
    box.fill(str(count))
    box.press("Enter")
    page.locator("#speclab-sweep").click()
    page.wait_for_function(  # measured and ideal: two points per setting, and the point list filled
        f"() => document.querySelectorAll('#speclab-sweep-plot .scatterlayer .point').length >= {2 * count}",
        timeout=180_000)


def test_sweep_draws_the_curve_and_picking_a_point_loads_its_run(browser, server):
    page = browser.new_page()
    try:
        _open(page, server)
        _small_run(page, 6)
        _sweep(page, 3)
        table = page.locator("#speclab-sweep-table").inner_text()
        assert "PSNR" in table
        # the middle point of SpeCa's threshold range (0..5 in 3 points): its row in the table
        row = next(line for line in table.splitlines() if line.strip().startswith("threshold base 2.5"))
        ideal = row.split("\t")[1].strip() if "\t" in row else row.split("|")[2].strip()
        page.locator("#speclab-sweep-pick input").click()
        page.get_by_role("option", name="threshold base 2.5").click()
        page.wait_for_function(
            "() => document.querySelector('#speclab-summary').innerText.includes('sweep point: threshold base 2.5')",
            timeout=60_000)
        summary = page.locator("#speclab-summary").inner_text()
        assert f"ideal speedup (compute, not time) {ideal}" in summary, (ideal, summary)
        assert "step 6/6" in summary
        # the point's setting is in the threshold control now, and its panels are shown
        page.wait_for_function(
            "() => document.querySelector('#speclab-speca_threshold input[type=number]').value === '2.5'",
            timeout=30_000)
        assert f"ideal {ideal}" in page.locator("#speclab-timeline .gtitle-subtitle").first.text_content()
    finally:
        page.close()


def test_target_speedup_finds_the_threshold(browser, server):
    """Target-speedup mode: the lab bisects SpeCa's threshold for an ideal speedup of 2 on this prompt, runs with
    it, says what it found, and puts the value found in the threshold control."""
    page = browser.new_page()
    try:
        _open(page, server)
        _small_run(page, 8)
        page.locator("#speclab-compare input[type=checkbox]").uncheck()
        target = page.locator("#speclab-target input[type=number]")
        target.fill("2")
        target.press("Enter")
        page.locator("#speclab-generate").click()
        page.wait_for_function(
            "() => { const s = document.querySelector('#speclab-summary').innerText; "
            "return s.includes('target speedup 2x') && s.includes('step 8/8'); }", timeout=180_000)
        summary = page.locator("#speclab-summary").inner_text()
        found = summary.split("threshold base = ")[1].split(" ")[0]
        reached = summary.split(" gives ")[1].split("x")[0]
        assert f"ideal speedup (compute, not time) {reached}x" in summary, summary  # the run is the one calibrated
        page.wait_for_function(
            "v => Number(document.querySelector('#speclab-speca_threshold input[type=number]').value) === Number(v)",
            arg=found, timeout=30_000)
    finally:
        page.close()


def test_dark_mode_figures_follow_the_page(browser, server, tmp_path):
    """?__theme=dark: the figures are transparent over the dark blocks, with light text; switching the page
    back to light (Gradio's settings toggle the body's class) redraws them with the template's dark text."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        page.goto(server + "?__theme=dark", wait_until="domcontentloaded", timeout=60_000)
        page.locator("#speclab-generate").wait_for(timeout=60_000)
        _wait_loaded(page)
        page.locator("#speclab-timeline .js-plotly-plot").wait_for(timeout=30_000)
        look = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => [gd._fullLayout.paper_bgcolor,
                   gd._fullLayout.plot_bgcolor, gd._fullLayout.font.color])"""
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')].every(gd => gd._fullLayout && "
            "gd._fullLayout.font.color === '#e5e7eb')", timeout=30_000)
        figures = page.evaluate(look)
        assert len(figures) >= 4
        assert all(paper == plot == "rgba(0, 0, 0, 0)" for paper, plot, _ in figures), figures
        block = page.evaluate("() => getComputedStyle(document.querySelector('#speclab-timeline')).backgroundColor")
        r, g, b = (int(v) for v in block[block.index("(") + 1:block.index(")")].split(",")[:3])
        assert r + g + b < 3 * 80, block  # a dark block behind the transparent figure
        page.evaluate("() => document.querySelector('#speclab-play').scrollIntoView()")  # the figures in view
        page.wait_for_function("() => document.querySelector('#speclab-play').getBoundingClientRect().top < 100",
                               timeout=10_000)
        _shot(page, tmp_path, "lab-dark.png", full_page=False)
        page.evaluate("() => document.body.classList.remove('dark')")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')].every(gd => gd._fullLayout.font.color === "
            "'#2a3f5f')", timeout=30_000)
    finally:
        page.close()


def test_phone_image_labels_do_not_cover_buttons_or_images(browser, server):
    page = browser.new_page()
    try:
        _open(page, server, 390, 844)
        # the example's pictures arrive after its summary (files the browser fetches): wait for all three to show
        page.wait_for_function(
            "() => ['#speclab-preview', '#speclab-image', '#speclab-full'].every(id => { "
            "const i = document.querySelector(id + ' img'); return i && i.complete && i.getBoundingClientRect().width; })",
            timeout=60_000)
        boxes = page.evaluate("""() => ['#speclab-preview', '#speclab-image', '#speclab-full'].map(id => {
            const box = (e) => { if (!e) return null; const r = e.getBoundingClientRect();
                                 return r.width && r.height ? [r.left, r.top, r.right, r.bottom] : null; };
            const b = document.querySelector(id);
            return {label: box(b.querySelector('[data-testid=block-label]')), img: box(b.querySelector('img')),
                    buttons: [...b.querySelectorAll('.icon-button-wrapper button')].map(box).filter(x => x)}; })""")
        overlap = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]  # noqa: E731
        for panel in boxes:
            assert panel["label"] and panel["img"], panel
            assert not overlap(panel["label"], panel["img"]), panel
            assert not any(overlap(panel["label"], b) for b in panel["buttons"]), panel
    finally:
        page.close()


def test_loading_a_trace_restores_the_controls(browser, server, tmp_path):
    import json

    import accel
    import tiny as tiny_mod

    pipe = tiny_mod.tiny_flux_pipe()
    handle = accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.5))
    tiny_mod.run(pipe, steps=6)
    handle.remove()
    trace = handle.trace
    trace.meta["run"] = dict(model=M.TINY, prompt="a small yellow triangle at the top, on a black background",
                             seed=5, steps=6, width=64, height=64, guidance=1.0, method="SpecDiff",
                             config=dict(trace.config))
    path = tmp_path / "restore_me.json"
    trace.to_json(str(path))
    assert json.loads(path.read_text())["meta"]["run"]["steps"] == 6
    page = browser.new_page()
    try:
        _open(page, server)
        page.get_by_text("Export / load a trace").click()
        page.locator("#speclab-upload input[type=file]").set_input_files(str(path))
        page.wait_for_function(
            "() => document.querySelector('#speclab-prompt textarea').value.includes('yellow triangle')",
            timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('#speclab-steps input[type=number]').value === '6'", timeout=10_000)
        assert page.locator("#speclab-specdiff_cache_rate input[type=number]").input_value() == "0.5"
        assert "loaded from restore_me.json" in page.locator("#speclab-summary").inner_text()
    finally:
        page.close()


def test_a_typo_names_the_field_and_leaves_the_panels_readable(browser, server):
    page = browser.new_page()
    try:
        _open(page, server)
        field = page.locator("#speclab-width input[type=number]")
        field.fill("100")
        field.press("Enter")
        page.locator("#speclab-generate").click()
        toast = page.locator(".toast-body, [data-testid='toast-body']").first
        toast.wait_for(timeout=30_000)
        assert "width=100" in toast.inner_text()
        for pid in ("speclab-image", "speclab-maps", "speclab-timeline"):  # the example's panels, no error badge
            assert "Error" not in page.locator(f"#{pid}").inner_text()
    finally:
        page.close()
