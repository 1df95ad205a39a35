"""Serve the slider explorer (``notebooks/explorer.ipynb``) as a web page with Voilà on 127.0.0.1: what
``python -m introspection_utils.explore`` and ``make explore`` run."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from introspection_utils.apps.runner import checks
from introspection_utils.apps.runner.checks import declared_parameters, parse_value
from introspection_utils.core.deprecation import renamed

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explorer.ipynb"
ENV = "INTROSPECTION_EXPLORER_PARAMETERS"
HOST = "127.0.0.1"
DEFAULT_PORT = 8866
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run")


def served(**defaults: Any) -> Any:
    """The notebook's parameters with the server's values (:data:`ENV`) applied, in the order given.

    ``model, concepts = served(model=model, concepts=concepts)``: unchanged outside ``explore`` (nbval, papermill,
    Jupyter). A served name that is not among ``defaults`` is an error.
    """
    given = json.loads(os.environ.get(ENV) or "{}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{ENV} sets {unknown}, which the notebook does not take; it takes {sorted(defaults)}")
    values = [given.get(name, value) for name, value in defaults.items()]
    return values[0] if len(values) == 1 else tuple(values)


def notebook_defaults(notebook: Path = NOTEBOOK) -> dict[str, Any]:
    """The notebook's ``parameters`` cell as ``{name: default value}`` (literals only)."""
    return {name: ast.literal_eval(info["default"]) for name, info in declared_parameters(notebook).items()}


def check_served_parameters(parameters: dict[str, Any], notebook: Path = NOTEBOOK) -> None:
    """The runner's checks, before the server starts: the values against the notebook's ``parameters`` cell
    (:func:`checks.check_parameters`) and the model with its layer (:func:`checks.check_model`). ``ValueError``."""
    try:
        checks.check_parameters(notebook.name, parameters, declared_parameters(notebook))
    except checks.NotebookError as err:
        raise ValueError(str(err)) from None
    checks.check_model(parameters.get("model") or notebook_defaults(notebook)["model"], parameters)


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A port that the OS reports free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def voila_command(port: int, notebook: Path = NOTEBOOK) -> list[str]:
    """The Voilà command line: loopback only, exactly ``port`` (no silent retry on another), no browser opened."""
    return [sys.executable, "-m", "voila", notebook.name, "--no-browser", f"--port={port}", f"--Voila.ip={HOST}",
            "--Voila.port_retries=0", "--VoilaConfiguration.show_tracebacks=True"]


def start(parameters: dict[str, Any], port: int, notebook: Path = NOTEBOOK, **popen: Any) -> subprocess.Popen:
    """Start Voilà on ``notebook`` with ``parameters`` (validated first) on ``127.0.0.1:port``; return the process."""
    check_served_parameters(parameters, notebook)
    if not port_is_free(port):
        raise ValueError(f"port {port} on {HOST} is in use: choose another with --port")
    # HF_HUB_DISABLE_PROGRESS_BARS: transformers' "Loading weights 100%" bar would stay on the page above the explorer.
    env = {**os.environ, ENV: json.dumps(parameters), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen(voila_command(port, notebook), cwd=notebook.parent, env=env, **popen)


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 60.0, host: str = HOST) -> str:
    """Block until the server accepts connections; return its URL. ``RuntimeError`` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Voilà exited with code {process.returncode} before listening on {host}:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return f"http://{host}:{port}/"
        time.sleep(0.2)
    raise RuntimeError(f"Voilà did not listen on {host}:{port} within {timeout:g} s")


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server (and its kernel), killing it if it does not exit within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def screenshot(url: str, path: str | Path, *, width: int = 1200, height: int = 1400,
               timeout: float = 600.0) -> Path:
    """Save ``url``'s explorer, once drawn, as a PNG at ``path`` (headless system Chromium; requests to other hosts
    than the loopback server are refused)."""
    from playwright.sync_api import sync_playwright  # optional: the test extra (screenshots only)

    if not CHROMIUM.is_file():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height})
        try:
            context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort())
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(url, wait_until="commit")  # Voilà streams the page while the notebook runs
            page.locator(".iu-status", has_text="ready").wait_for(timeout=timeout * 1000)
            page.locator("img.iu-figure").wait_for(timeout=timeout * 1000)
            page.screenshot(path=str(path))
        finally:
            context.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m introspection_utils.explore", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model id or folder (default: the notebook's, the embedded SmolLM2)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="another parameter of the notebook, e.g. -p concepts \"['Sandwich','Water']\"")
    parser.add_argument("--screenshot", metavar="PNG", help="save the page once drawn to PNG, then stop the server")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    if args.model:
        parameters["model"] = args.model
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` stops Voilà and its kernel
    try:
        process = start(parameters, args.port)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        url = wait_until_listening(process, args.port, args.startup_timeout)
        model = parameters.get("model") or notebook_defaults()["model"]
        print(f"The explorer ({model}) is served at {url}  (the page computes on first load; Ctrl-C stops it)",
              flush=True)
        if args.screenshot:
            print(f"saved {screenshot(url, args.screenshot)}")
            return 0
        return process.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stop(process)


__getattr__ = renamed(__name__, globals(), {"check_parameters": "check_served_parameters"})  # the old name, one release


if __name__ == "__main__":
    sys.exit(main())
