"""Data files: every list loads with its source, the paper's counts, and malformed copies are rejected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from introspection_utils.core import data

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture
def fresh_loaders():
    """The loaders are memoised: clear them around a test that points them at other files."""
    data.load_list.cache_clear()
    data.load_prompts.cache_clear()
    yield
    data.load_list.cache_clear()
    data.load_prompts.cache_clear()


@pytest.fixture
def data_copy(tmp_path, monkeypatch, fresh_loaders):
    """A writable copy of ``data/`` that the loaders read through ``$INTROSPECTION_DATA``."""
    folder = tmp_path / "data"
    shutil.copytree(DATA, folder)
    monkeypatch.setenv("INTROSPECTION_DATA", str(folder))
    return folder


@pytest.mark.parametrize("name", data.WORD_LISTS)
def test_every_word_list_loads_with_a_source_header(name):
    words = data.load_list(name)
    assert words.name == name
    assert words.source.startswith("Source:")
    assert len(words) > 0
    assert all(item == item.strip() and item for item in words)


def test_concept_words_are_the_papers_50():
    words = data.load_list("concept_words")
    assert len(words) == 50 and len(set(words)) == 50
    assert words[0] == "Dust"


def test_baseline_words_are_100_with_the_papers_duplicate_documented():
    words = data.load_list("baseline_words")
    assert len(words) == 100
    assert [w for w in set(words) if list(words).count(w) > 1] == ["Butterflies"]
    assert len(set(words)) == 99
    assert "Butterflies" in words.source  # the header says the duplicate is the paper's own
    assert data.KNOWN_DUPLICATES == {"baseline_words": {"Butterflies"}}


def test_control_questions_are_20_yes_no_questions():
    questions = data.load_list("control_questions")
    assert len(questions) == 20 and len(set(questions)) == 20
    assert all(q.endswith("?") for q in questions)


def test_unknown_word_list_names_the_available_ones():
    with pytest.raises(ValueError, match="concept_words"):
        data.load_list("concepts")


def test_every_prompts_section_has_a_source():
    prompts = data.load_prompts()
    assert {"concept_extraction", "injected_thought", "answers"} <= set(prompts)
    for section, fields in prompts.items():
        assert fields["source"].strip(), section
    assert prompts["injected_thought"]["separator"] == "\n\n"
    assert prompts["answers"]["yes"] == "Yes" and prompts["answers"]["no"] == "No"


def test_gemma_chat_template_is_shipped_and_unknown_template_raises():
    assert "<start_of_turn>" in data.chat_template("gemma")
    with pytest.raises(ValueError, match="no chat template 'nope'"):
        data.chat_template("nope")


def _rewrite(path: Path, edit) -> None:
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("\nSatellites\n", "\n\nSatellites\n"), "empty line"),
    (lambda text: text.replace("\nSatellites\n", "\nSatellites \n"), "surrounding whitespace"),
    (lambda text: text + "Dust\n", "duplicate item 'Dust'"),
    (lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n",
     "Source"),
], ids=["empty-line", "trailing-space", "undocumented-duplicate", "missing-source"])
def test_malformed_word_list_raises(data_copy, edit, message):
    _rewrite(data_copy / "concept_words.txt", edit)
    with pytest.raises(ValueError, match=message):
        data.load_list("concept_words")


def test_documented_duplicate_is_allowed_only_in_its_own_list(data_copy):
    assert list(data.load_list("baseline_words")).count("Butterflies") == 2  # the copy loads as the original
    _rewrite(data_copy / "concept_words.txt", lambda text: text + "Butterflies\nButterflies\n")
    with pytest.raises(ValueError, match="duplicate item 'Butterflies'"):
        data.load_list("concept_words")


def test_prompts_section_without_source_raises(data_copy):
    _rewrite(data_copy / "prompts.toml", lambda text: text.replace(
        'source = "Lindsey 2025, appendix \'Injected Thoughts\': main injected-thought prompt"\n', ""))
    with pytest.raises(ValueError, match=r"\[injected_thought\] has no source"):
        data.load_prompts()


def test_prompts_empty_field_raises(data_copy):
    _rewrite(data_copy / "prompts.toml", lambda text: text.replace('assistant_ack = "Ok."', 'assistant_ack = " "', 1))
    with pytest.raises(ValueError, match="empty fields"):
        data.load_prompts()


def test_missing_data_folder_says_how_to_fix(tmp_path, monkeypatch, fresh_loaders):
    monkeypatch.setenv("INTROSPECTION_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="INTROSPECTION_DATA"):
        data.load_list("concept_words")
