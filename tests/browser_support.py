"""Helpers for the browser test: a throwaway JupyterLab server and Playwright steps in it.

The browser is Debian's Chromium (``apt-get install chromium``) driven by Playwright's
Python package (``pip install playwright``) through ``executable_path``: nothing is
downloaded (never ``playwright install``). JupyterLab serves a temporary copy of the
notebooks, with its own settings, workspaces and runtime folders, and is stopped by its
process group whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

#: Flags for headless Chromium in a container (no sandbox, no GPU, no network chatter).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

INSTALL_HINT = (
    "install Debian's Chromium and Playwright's Python package: "
    "`apt-get install chromium` and `pip install playwright` "
    "(no `playwright install`: the test launches the system Chromium)"
)

#: JupyterLab user settings: start the notebook's kernel without asking, no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def find_chromium() -> str | None:
    """The Chromium executable: ``$DINO_NB_CHROMIUM``, else ``chromium`` on the PATH, else ``None``."""
    env = os.environ.get("DINO_NB_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def missing_requirement() -> str | None:
    """Why the browser test cannot run here (a skip reason naming the fix), or ``None``."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"Playwright's Python package is missing; {INSTALL_HINT}"
    if find_chromium() is None:
        return f"no Chromium executable found; {INSTALL_HINT}"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return 'JupyterLab is missing; pip install -e ".[dev]"'
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    """A running JupyterLab: its address, process and where it logs."""

    url: str
    process: subprocess.Popen
    root: Path
    log: Path

    def log_tail(self, n_chars: int = 3000) -> str:
        """The end of the server's log (it holds the kernels' stderr too)."""
        try:
            return self.log.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"


def _descendants(pid: int) -> list[int]:
    """PIDs of a process's descendants (kernels start their own sessions, so killpg misses them)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True``, its group and its descendants.

    SIGTERM to the group first (JupyterLab then shuts its kernels down), SIGKILL after
    ``grace_s`` seconds; descendants in other sessions (kernels) still alive are killed by
    PID.
    """
    if process.poll() is not None:
        return
    children = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    deadline = time.monotonic() + 5.0
    for pid in children:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"jupyter-lab exited with code {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                json.load(r)
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(
        f"jupyter-lab did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


@contextlib.contextmanager
def jupyter_lab(
    work: Path, env: dict[str, str] | None = None, start_timeout_s: float = 90.0
) -> Iterator[LabServer]:
    """Serve a copy of the repository's notebooks with JupyterLab on a free loopback port.

    The committed notebooks are never touched: ``work/notebooks`` holds copies (the kernel's
    working directory). Settings, workspaces, the runtime folder, Jupyter's config and data
    folders and IPython's folder all live under ``work``, so the user's own Jupyter setup
    (a password, another ``python3`` kernel) does not leak in. The server is stopped by its
    process group when the block ends, however it ends.

    Args:
        work: an empty scratch folder.
        env: extra environment variables for the server and its kernels.
        start_timeout_s: how long to wait for the server to answer.
    """
    root = work / "notebooks"
    root.mkdir(parents=True)
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        shutil.copy2(nb, root / nb.name)
    settings = work / "lab-settings"
    for rel, values in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    full_env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")
    for var, sub in (
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("IPYTHONDIR", "ipython"),
    ):
        (work / sub).mkdir()
        full_env[var] = str(work / sub)
    full_env.update(env or {})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "jupyterlab",  # the server itself (not the `jupyter lab` wrapper), so its PID is ours
        "--no-browser", "--ip", "127.0.0.1", "--port", str(port), "--port-retries=0",
        "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={work / 'workspaces'}",
    ]  # fmt: skip
    log = work / "jupyter-lab.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=root, env=full_env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_until_up(url, process, log, start_timeout_s)
        yield LabServer(url=url, process=process, root=root, log=log)
    finally:
        stop_process_group(process)


# --------------------------------------------------------------------------- in the page

_PANEL_JS = """
(name) => Array.from(window.jupyterapp.shell.widgets('main'))
    .find(w => w.context && w.context.path === name)
"""


def open_notebook(page, server: LabServer, name: str, timeout_s: float = 60.0) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel is idle."""
    # ?reset: a fresh workspace, so notebooks opened by earlier pages do not come back
    page.goto(f"{server.url}/lab/tree/{name}?reset", timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_s * 1000)
    page.wait_for_function(
        f"(name) => {{ const p = ({_PANEL_JS})(name); return p && p.sessionContext.session"
        " && p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }",
        arg=name,
        timeout=timeout_s * 1000,
    )


def run_all_cells(page, name: str, timeout_s: float) -> bool:
    """Run every cell of the open notebook ``name``; ``False`` when a cell failed.

    Uses JupyterLab's ``notebook:run-all-cells`` command (the Run menu's "Run All Cells")
    and waits for it to finish, then for the kernel to be idle.
    """
    page.evaluate(
        f"""(name) => {{
            const panel = ({_PANEL_JS})(name);
            window.jupyterapp.shell.activateById(panel.id);
            window.__runAll = undefined;
            window.jupyterapp.commands.execute('notebook:run-all-cells').then(
                ok => {{ window.__runAll = ok; }}, err => {{ window.__runAll = 'error: ' + err; }});
        }}""",
        name,
    )
    page.wait_for_function("() => window.__runAll !== undefined", timeout=timeout_s * 1000)
    result = page.evaluate("() => window.__runAll")
    wait_kernel_idle(page, name, timeout_s=30)
    if isinstance(result, str):
        raise RuntimeError(f"notebook:run-all-cells failed in {name}: {result}")
    return bool(result)


def wait_kernel_idle(page, name: str, timeout_s: float = 30.0) -> None:
    """Wait until the kernel of the open notebook ``name`` is idle."""
    page.wait_for_function(
        f"(name) => ({_PANEL_JS})(name).sessionContext.session.kernel.status === 'idle'",
        arg=name,
        timeout=timeout_s * 1000,
    )


_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b", re.MULTILINE
)


def error_outputs(page, name: str) -> list[str]:
    """Errors the open notebook ``name`` shows: error outputs in its model and tracebacks on screen.

    Screen: any ``.jp-OutputArea-output`` of MIME type ``application/vnd.jupyter.stderr``
    (how JupyterLab renders stderr and errors, widget outputs included) whose text looks like
    a traceback or an exception. Model: outputs of type ``error`` in the notebook's cells.
    """
    on_screen = page.evaluate(
        """() => Array.from(document.querySelectorAll(
                '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
            .map(e => e.textContent)"""
    )
    in_model = page.evaluate(
        f"""(name) => ({_PANEL_JS})(name).context.model.toJSON().cells
            .flatMap(c => c.outputs || [])
            .filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue)""",
        name,
    )
    return [t[:2000] for t in on_screen if _TRACEBACK.search(t)] + list(in_model)


def interact_panel(page, label: str):
    """The ``interact`` widget box that holds a control whose description is exactly ``label``."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return (
        page.locator(".widget-interact")
        .filter(has=page.locator("label.widget-label", has_text=exact))
        .first
    )


def control(panel, label: str):
    """The control (slider, dropdown, ...) described by ``label`` inside an interact panel."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return (
        panel.locator(".jupyter-widgets.widget-inline-hbox")
        .filter(has=panel.page.locator("label.widget-label", has_text=exact))
        .first
    )


def control_value(ctrl) -> str:
    """What a control shows: a slider's readout or a dropdown's selected option."""
    select = ctrl.locator("select")
    if select.count():
        return select.evaluate("s => s.options[s.selectedIndex].text")
    # text_content, not inner_text: cells off screen are not laid out (content-visibility)
    text = ctrl.locator(".widget-readout").text_content() or ""
    return text.strip().replace("\u2212", "-")  # negatives are written with U+2212 (minus sign)


def nudge(ctrl, presses: int = 1, timeout_s: float = 20.0) -> tuple[str, str]:
    """Move a control to a later value as a person would; returns (value before, value after).

    A slider: focus its handle and press the right arrow key ``presses`` times. A dropdown:
    pick the option ``presses`` places further down (wrapping round).
    """
    before = control_value(ctrl)
    select = ctrl.locator("select")
    if select.count():
        n, i = select.evaluate("s => [s.options.length, s.selectedIndex]")
        select.select_option(index=(i + presses) % n)
    else:
        handle = ctrl.locator("[role=slider]").first
        handle.wait_for(state="attached", timeout=timeout_s * 1000)
        handle.scroll_into_view_if_needed(timeout=timeout_s * 1000)
        handle.focus()
        for _ in range(presses):
            handle.press("ArrowRight")
    deadline = time.monotonic() + timeout_s
    after = control_value(ctrl)
    while after == before and time.monotonic() < deadline:
        time.sleep(0.1)
        after = control_value(ctrl)
    return before, after


def output_image_src(panel, timeout_s: float = 30.0) -> str:
    """The ``src`` (a data URL) of the figure in an interact panel's output."""
    img = panel.locator(".widget-output img").first
    img.wait_for(state="attached", timeout=timeout_s * 1000)
    return img.get_attribute("src") or ""


def wait_new_image(panel, old_src: str, timeout_s: float = 60.0) -> str:
    """Wait until the interact panel's output shows a figure other than ``old_src``; its src."""
    panel.page.wait_for_function(
        """([box, old]) => { const img = box.querySelector('.widget-output img');
                              return img && img.getAttribute('src') && img.getAttribute('src') !== old; }""",
        arg=[panel.element_handle(), old_src],
        timeout=timeout_s * 1000,
    )
    return output_image_src(panel)


def png_from_data_url(src: str):
    """Decode a ``data:image/png;base64,...`` or ``data:image/jpeg;base64,...`` URL (the
    notebooks show JPEG figures, see ``explore.light_figures``) into an RGB ``(H, W, 3)`` uint8 array."""
    import numpy as np
    from PIL import Image

    prefix = next(
        (p for p in ("data:image/png;base64,", "data:image/jpeg;base64,") if src.startswith(p)),
        None,
    )
    if prefix is None:
        raise ValueError(f"expected a PNG or JPEG data URL, got {src[:40]!r}...")
    with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))) as img:
        return np.asarray(img.convert("RGB"))  # (H, W, 3)


def colour_pixels(rgb, colours, region: slice | None = None, tolerance: int = 0) -> list[int]:
    """How many pixels of ``rgb`` (``(H, W, 3)`` uint8) have each RGB colour in ``colours`` (0-1 floats).

    Args:
        rgb: the image.
        colours: ``(n, 3 or 4)`` floats in [0, 1] (e.g. matplotlib colours).
        region: columns to look at (default: all).
        tolerance: largest difference per channel that still counts (0: exact; JPEG needs some).
    """
    import numpy as np

    part = (rgb if region is None else rgb[:, region]).astype(np.int16)
    targets = np.round(np.asarray(colours)[:, :3] * 255).astype(np.int16)  # (n, 3)
    return [int((np.abs(part - c) <= tolerance).all(axis=-1).sum()) for c in targets]
