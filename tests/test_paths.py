"""The one home of paths and provenance: short model names, figure/result folders, the atomic write."""

from __future__ import annotations

import os

import pytest

from introspection_utils.core import paths


@pytest.mark.parametrize(("given", "short"), [("google/gemma-2-9b-it", "gemma-2-9b-it"),
                                              ("meta-llama/Llama-3.1-8B-Instruct/", "llama-3.1-8b-instruct"),
                                              ("smollm2-135m-instruct", "smollm2-135m-instruct")])
def test_model_name_is_the_lowercased_last_path_part(given, short):
    assert paths.model_name(given) == short


def test_model_name_of_a_handle_is_its_name(tiny_llama):
    assert paths.model_name(tiny_llama) == tiny_llama.name == "tiny-llama"


def test_folders_given_are_used_as_is(tmp_path):
    assert paths.figures_dir("x/Model", tmp_path) == tmp_path
    assert paths.results_dir("x/Model", tmp_path) == tmp_path
    assert paths.results_dir("x/Model") == paths.project_root() / "data" / "results" / "model"


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert paths.atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert paths.atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    paths.atomic_write(tmp_path / "c.txt", lambda tmp: tmp.write_text("via writer"))
    assert (tmp_path / "c.txt").read_text() == "via writer"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "c.txt", "t.txt"]


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = paths.atomic_write(tmp_path / "t.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        paths.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_atomic_write_gives_the_file_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = paths.atomic_write(tmp_path / "t.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: others may read results and figures
