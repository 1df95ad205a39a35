"""The explorer as a web page, in a real browser.

``python -m introspection_utils.explore --model tiny-llama`` serves ``notebooks/explorer.ipynb`` with Voilà on a free
loopback port; Playwright drives Debian's Chromium headless (the system binary, no browser download), moves the scale
slider with the keyboard, changes the concept, and each time the numbers on the page must equal
``ExplorerState.values(...)`` computed here for the same settings, to the printed precision. The page as the test left
it is saved to ``test-artifacts/explorer_web.png``.

The test waits on readiness, never on a clock: on the server's own signal (the command prints "is served at" once Voilà
accepts connections) and on the page's computed state (the explorer's status line says "ready" once the notebook has
run and drawn). The bounds are generous (a loaded 2-core machine, the kernel importing torch and running a sweep)
and only there to end a hung run; a run that hits one fails saying what it was waiting for, with the server's log and
every thread's stack in the kernel at that moment (an IPython startup file in a private ``IPYTHONDIR`` registers
``faulthandler`` on SIGUSR1, writing to a file the test reads), so a hang says where it is.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from introspection_utils.apps import explore

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = explore.CHROMIUM  # /usr/bin/chromium
ARTIFACTS = ROOT / "test-artifacts"
MODEL = "tiny-llama"
SERVER_BOUND_S = 300  # the command's readiness line: Voilà started and listening
PAGE_BOUND_S = 600  # the page's first computed state: the kernel imports torch, loads the model, runs one sweep
STEP_BOUND_S = 300  # after a control moves: a redraw from the cache, or one new sweep

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"Debian's Chromium is not installed at {CHROMIUM}: `make test` installs it (apt-get install chromium "
           "chromium-driver); Playwright is used with the system browser and never downloads one")


STACKS: dict = {}  # "file": where the served kernel writes its threads' stacks on SIGUSR1; "server": its pid
FAULTHANDLER_STARTUP = """import faulthandler, os, signal
faulthandler.register(signal.SIGUSR1, file=open(os.environ["IU_TEST_KERNEL_STACKS"], "a"), all_threads=True)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(url, log)``: the explorer served on a free loopback port; always stopped (process group killed)."""
    port = explore.free_port()
    command = [sys.executable, "-m", "introspection_utils.explore", "--model", MODEL, "--port", str(port),
               "--startup-timeout", str(SERVER_BOUND_S)]
    ipython_dir = tmp_path_factory.mktemp("ipython")
    (ipython_dir / "profile_default" / "startup").mkdir(parents=True)
    (ipython_dir / "profile_default" / "startup" / "00-stacks-on-sigusr1.py").write_text(FAULTHANDLER_STARTUP)
    STACKS["file"] = ipython_dir / "kernel-stacks.txt"
    env = {**os.environ, "IPYTHONDIR": str(ipython_dir), "IU_TEST_KERNEL_STACKS": str(STACKS["file"])}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=env)
    STACKS["server"] = process.pid
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read() -> None:  # the whole output in ``log`` (for failure messages), each line also to the readiness loop
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        url, started = None, time.monotonic()
        while url is None and time.monotonic() - started < SERVER_BOUND_S + 30 and process.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "is served at http://127.0.0.1:" in line:
                url = line.split(" is served at ")[1].split()[0]
        waited = f"{time.monotonic() - started:.0f} s"
        assert process.poll() is None or url, (f"the explorer exited with code {process.returncode} after {waited}, "
                                               "before its readiness line ('is served at'):\n" + "".join(log))
        assert url == f"http://127.0.0.1:{port}/", (
            f"waited {waited} (bound {SERVER_BOUND_S} s + 30) for the explorer's readiness line 'is served at "
            f"http://127.0.0.1:{port}/' (printed once Voilà accepts connections); its output:\n" + "".join(log))
        yield url, log
    finally:
        _kill(process)


@contextmanager
def waiting_for(what: str, bound_s: float, log: list[str]) -> Iterator[float]:
    """Run the block (which waits up to ``bound_s`` seconds, passed in as milliseconds); if it times out or its
    expectation fails, fail saying what was awaited, for how long, and what the server printed."""
    started = time.monotonic()
    try:
        yield bound_s * 1000
    except Exception as err:  # playwright's TimeoutError, expect()'s AssertionError
        raise AssertionError(f"waited {time.monotonic() - started:.0f} s (bound {bound_s:g} s) for {what}: {err}\n"
                             "server log:\n" + "".join(log) + "\n" + _kernel_stacks()) from err


def _kernel_stacks() -> str:
    """Every thread's stack in the served kernel(s), now: SIGUSR1 to each ipykernel process descended from the
    server (its startup file registered faulthandler on it), then what they wrote."""
    parents, cmdlines = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the fields after the name: state, ppid, ...
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == STACKS.get("server"):
                return True
        return False

    kernels = [pid for pid in parents if b"ipykernel" in cmdlines.get(pid, b"") and descends(pid)]
    for pid in kernels:
        os.kill(pid, signal.SIGUSR1)
    time.sleep(3)
    path = STACKS.get("file")
    text = path.read_text() if path and path.is_file() else "(nothing written)"
    return f"the kernel's threads (pids {kernels}) when the wait ended:\n{text}"


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM to the wrapper's process group (it stops Voilà and the kernel), SIGKILL after 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def reference():
    """The explorer's computing part in this process, with the notebook's own defaults (its parameters cell),
    its dtype included: ``"auto"`` is bfloat16 on a CPU with AMX or AVX-512 BF16, whose numbers differ from float32's
    in the second decimal the page prints."""
    from introspection_utils import default_layer, load_model
    from introspection_utils.apps.widgets import ExplorerState

    p = explore.notebook_defaults()
    handle = load_model(MODEL, dtype=p["dtype"])
    state = ExplorerState(handle, p["concepts"], scales=p["scales"], n_controls=p["n_controls"], seed=p["seed"])
    return state, default_layer(handle, p["layer"])


def _printed(state, concept: str, layer: int, scale: float) -> tuple[str, str]:
    v = state.values(concept, layer, scale)
    return f"{v['introspection']:+.2f}", f"{v['control_mean']:+.2f}"


def test_page_numbers_follow_the_scale_slider_and_the_concept(server, reference, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    url, log = server
    state, layer = reference
    first, second = state.concepts[:2]
    start = len(state.scales) // 2  # the scale slider's initial position (Explorer)
    assert start + 2 < len(state.scales), "the test moves the scale slider two steps right"
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=list(explore.CHROMIUM_FLAGS), viewport={"width": 1200, "height": 1500})
        # Nothing leaves the machine: the page's requests to other hosts (Voilà's CDN MathJax) fail at once.
        context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort())
        page = context.pages[0] if context.pages else context.new_page()
        try:
            with waiting_for(f"the first bytes of {url}", SERVER_BOUND_S, log) as ms:
                page.goto(url, wait_until="commit", timeout=ms)  # Voilà streams the page while the notebook runs
            intro, control = page.locator(".iu-introspection"), page.locator(".iu-control-mean")
            status, figure = page.locator(".iu-status"), page.locator("img.iu-figure")

            def expect_numbers(concept: str, scale: float) -> None:
                want = _printed(state, concept, layer, scale)
                with waiting_for(f"the page's numbers for {concept!r} at scale {scale} ({want[0]}, {want[1]})",
                                 STEP_BOUND_S, log) as ms:
                    sync_api.expect(intro).to_have_text(want[0], timeout=ms)
                    sync_api.expect(control).to_have_text(want[1], timeout=ms)

            def expect_status(text: str, bound_s: float = STEP_BOUND_S) -> None:
                with waiting_for(f"the explorer's status line to say {text!r}", bound_s, log) as ms:
                    sync_api.expect(status).to_contain_text(text, timeout=ms)

            # The page's computed state: the notebook has run and the explorer says "ready", its first sweep cached.
            expect_status("ready · 1 (concept, layer) sweep(s) cached", PAGE_BOUND_S)
            expect_numbers(first, state.scales[start])

            def wait_for_new_figure(old: str | None) -> str:
                with waiting_for("a new figure (the image's src to change)", STEP_BOUND_S, log) as ms:
                    page.wait_for_function("([sel, old]) => { const img = document.querySelector(sel); "
                                           "return img !== null && img.getAttribute('src') !== old; }",
                                           arg=["img.iu-figure", old], timeout=ms)
                return figure.first.get_attribute("src")

            shown = wait_for_new_figure(None)

            # Two steps right on the focused scale handle: the numbers and the figure follow, from the cache.
            handle = page.locator(".iu-scale .noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            moved = state.scales[start + 2]
            with waiting_for(f"the scale slider to show {moved}", STEP_BOUND_S, log) as ms:
                sync_api.expect(page.locator(".iu-scale")).to_contain_text(f"{moved}", timeout=ms)
            expect_numbers(first, moved)
            assert _printed(state, first, layer, moved) != _printed(state, first, layer, state.scales[start])
            expect_status("1 (concept, layer) sweep(s) cached")
            shown = wait_for_new_figure(shown)

            # Another concept: one new sweep, its numbers.
            page.locator(".iu-concept select").select_option(second)
            expect_numbers(second, moved)
            assert _printed(state, second, layer, moved) != _printed(state, first, layer, moved)
            expect_status("2 (concept, layer) sweep(s) cached")
            wait_for_new_figure(shown)
        except Exception:
            print("server log:\n" + "".join(log))
            raise
        finally:
            page.screenshot(path=str(ARTIFACTS / "explorer_web.png"))
            context.close()
    assert (ARTIFACTS / "explorer_web.png").stat().st_size > 10_000


def test_screenshot_waits_for_the_drawn_explorer(server, tmp_path):
    """``explore --screenshot``'s capture: it returns once the page says "ready" and shows the figure's image."""
    pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    url, log = server
    with waiting_for("explore.screenshot to capture the drawn page", PAGE_BOUND_S, log):
        path = explore.screenshot(url, tmp_path / "page.png", timeout=PAGE_BOUND_S)
    assert path.stat().st_size > 10_000
