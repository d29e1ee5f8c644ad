"""End to end: notebooks 01 and 05 in JupyterLab, in headless Chromium, sliders moved by key presses.

Needs Debian's Chromium (``apt-get install chromium``) and ``pip install playwright``
(no browser download); skips with that advice when either is missing. JupyterLab serves a
temporary copy of the notebooks (the committed files are never written) in the ``ci``
profile, on a free loopback port, and is stopped by its process group afterwards.
Screenshots of every state go to ``runs/browser-screenshots/`` (git-ignored); the folder
is printed when the test starts. Run only this with ``pytest -m browser tests/test_browser.py``.
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
from browser_support import (
    CHROMIUM_ARGS,
    REPO,
    colour_pixels,
    control,
    control_value,
    error_outputs,
    find_chromium,
    interact_panel,
    jupyter_lab,
    missing_requirement,
    nudge,
    open_notebook,
    output_image_src,
    png_from_data_url,
    run_all_cells,
    wait_kernel_idle,
    wait_new_image,
)

REASON = missing_requirement()
pytestmark = [pytest.mark.browser, pytest.mark.slow]
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))

SHOTS = REPO / "runs" / "browser-screenshots"
VIEWPORT = {"width": 1400, "height": 1000}
NB01 = "01_augmentations.ipynb"
NB05 = "05_knn_and_embeddings.ipynb"


@pytest.fixture(scope="module")
def shots(request):
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    message = f"browser test screenshots: {SHOTS}"
    print(message)  # shown with the test's output on failure (and with -s / -rA)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if (
        reporter is not None and capture is not None
    ):  # and in the terminal now, past pytest's capture
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{message}")
    return SHOTS


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    env = {
        "DINO_NB_PROFILE": "ci",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DINO_NB_RUNS": str(
            tmp_path_factory.mktemp("runs")
        ),  # not the checkout's runs/ that nbval uses
    }
    with jupyter_lab(tmp_path_factory.mktemp("jupyterlab"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=find_chromium(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, lab, shots):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):  # free the kernel's memory for the next notebook
            page.evaluate(
                """async () => { for (const w of Array.from(window.jupyterapp.shell.widgets('main')))
                                     if (w.sessionContext) await w.sessionContext.shutdown(); }"""
            )
        page.close()


@contextlib.contextmanager
def on_failure(page, lab, name):
    """Screenshot the page and attach the server log when the block raises."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(SHOTS / f"{name}-FAILED.png"))
        note = f"screenshots in {SHOTS}; jupyter-lab log {lab.log}:\n{lab.log_tail()}"
        if hasattr(exc, "add_note"):  # Python >= 3.11: shown under the error
            exc.add_note(note)
        else:
            print(note)  # shown with the captured output
        raise


def shoot(locator, name):
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(SHOTS / name))


def assert_no_errors(page, name):
    errors = error_outputs(page, name)
    assert errors == [], f"{name} shows errors:\n" + "\n---\n".join(errors)


def assert_crop_boxes_drawn(src, n_views):
    """The figure's left part (the original) holds both global boxes' colours (edges and labels)."""
    from dino_nb.notebook.figures import class_colors

    rgb = png_from_data_url(src)  # (H, W, 3)
    assert rgb.shape[1] > 2 * rgb.shape[0], (
        f"expected a wide figure (original + views), got {rgb.shape}"
    )
    # the original fills about the left third of the figure; a global box covers >= 40% of the
    # image, so its left edge and label lie in the original's left 60%: the figure's left quarter.
    # Exact box colours there (about 1000-2000 pixels each when drawn) are absent from the photos.
    left = slice(0, rgb.shape[1] // 4)
    counts = colour_pixels(rgb, class_colors(n_views)[:2], region=left, tolerance=40)  # JPEG
    assert min(counts) >= 200, (
        f"global crop boxes G1, G2 not drawn on the original: pixels per colour {counts}"
    )
    return rgb


def test_augmentation_explorer_redraws_when_image_and_seed_change(page, lab, shots):
    with on_failure(page, lab, "01"):
        open_notebook(page, lab, NB01)
        assert run_all_cells(page, NB01, timeout_s=120), "Run All stopped at a failing cell"
        assert_no_errors(page, NB01)
        page.screenshot(path=str(SHOTS / "01-0-after-run-all.png"))

        panel = interact_panel(page, "seed")
        n_views = 2 + int(control_value(control(panel, "local crops")))
        src0 = output_image_src(panel)
        rgb0 = assert_crop_boxes_drawn(src0, n_views)
        shoot(panel, f"01-1-image-{control_value(control(panel, 'image'))}-seed-0.png")

        before, after = nudge(control(panel, "image"))
        assert after != before, f"the image dropdown did not change ({before})"
        src1 = wait_new_image(panel, src0)
        assert src1 != src0
        rgb1 = assert_crop_boxes_drawn(src1, n_views)
        assert rgb1.shape != rgb0.shape or (rgb1 != rgb0).any()
        wait_kernel_idle(page, NB01)
        shoot(panel, f"01-2-image-{after}.png")

        image = after
        before, after = nudge(control(panel, "seed"), presses=3)
        assert (before, after) == ("0", "3"), (
            f"seed slider moved from {before} to {after}, expected 0 -> 3"
        )
        src2 = wait_new_image(panel, src1)
        rgb2 = assert_crop_boxes_drawn(src2, n_views)
        assert rgb2.shape != rgb1.shape or (rgb2 != rgb1).any(), "a new seed drew the same crops"
        wait_kernel_idle(page, NB01)
        shoot(panel, f"01-3-image-{image}-seed-{after}.png")
        assert_no_errors(page, NB01)


def test_attention_explorer_redraws_when_head_and_image_change(page, lab, shots):
    with on_failure(page, lab, "05"):
        open_notebook(page, lab, NB05)
        # the first cells train the ci run (the cpu recipe, 372 steps: about 90 s on an idle
        # 2-core machine; no notebook 04 run in this temporary runs folder to reuse)
        assert run_all_cells(page, NB05, timeout_s=600), "Run All stopped at a failing cell"
        assert_no_errors(page, NB05)
        page.screenshot(path=str(SHOTS / "05-0-after-run-all.png"))

        panel = interact_panel(page, "head")
        src0 = output_image_src(panel)
        assert png_from_data_url(src0).size > 0
        shoot(panel, "05-1-head-mean.png")

        before, after = nudge(control(panel, "head"))
        assert (before, after) == ("-1", "0"), (
            f"head slider moved from {before} to {after}, expected -1 -> 0"
        )
        src1 = wait_new_image(panel, src0)
        assert src1 != src0
        wait_kernel_idle(page, NB05)
        shoot(panel, "05-2-head-0.png")

        before, after = nudge(control(panel, "image"))
        assert after != before, f"the image slider did not move ({before})"
        src2 = wait_new_image(panel, src1)
        assert src2 != src1
        wait_kernel_idle(page, NB05)
        shoot(panel, f"05-3-head-0-image-{after}.png")
        assert_no_errors(page, NB05)
