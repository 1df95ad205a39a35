"""The web explorer's launcher without a browser: parameters reach the notebook through one environment variable,
names are checked against the notebook's parameters cell, and the server is loopback-only on exactly the given port.
(The browser end to end is tests/test_explorer_web.py.)"""

from __future__ import annotations

import json
import socket

import pytest

from introspection_utils.apps import explore


def test_served_returns_the_defaults_unless_the_server_sets_them(monkeypatch):
    monkeypatch.delenv(explore.ENV, raising=False)
    assert explore.served(model="m", layer=None) == ("m", None)
    monkeypatch.setenv(explore.ENV, json.dumps({"model": "tiny-llama"}))
    assert explore.served(model="m", layer=None) == ("tiny-llama", None)
    assert explore.served(model="m") == "tiny-llama"


def test_served_rejects_a_name_the_notebook_does_not_take(monkeypatch):
    monkeypatch.setenv(explore.ENV, json.dumps({"colour": 1}))
    with pytest.raises(ValueError, match=r"sets \['colour'\], which the notebook does not take"):
        explore.served(model="m")


def test_the_notebook_declares_the_defaults_the_launcher_checks_against():
    defaults = explore.notebook_defaults()
    assert defaults["model"] == "smollm2-135m-instruct"
    assert {"concepts", "layer", "scales", "n_controls", "seed"} <= set(defaults)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['colour'\]"):
        explore.check_served_parameters({"model": "tiny-llama", "colour": 1})
    explore.check_served_parameters({"model": "tiny-llama", "concepts": ["Sandwich"]})


def test_voila_listens_on_loopback_on_exactly_the_given_port():
    cmd = explore.voila_command(8870)
    assert "--Voila.ip=127.0.0.1" in cmd and "--port=8870" in cmd and "--Voila.port_retries=0" in cmd
    assert "--no-browser" in cmd


def test_a_busy_port_is_an_error_before_anything_starts():
    with socket.socket() as sock:
        sock.bind((explore.HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
            explore.start({"model": "tiny-llama"}, port)
