"""The model organisms (``experiments/organisms``, notebook 14): the training data disjoint from the evaluation (read
from the files), the training hook injecting exactly what the engine injects, a step that lowers its loss, the cache
key, determinism, resuming, and the merged folder against base + adapter."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import peft
import pytest
import torch

from introspection_utils.core.data import tomllib, word_forms
from introspection_utils.engine.prompts import introspection_prompt
from introspection_utils.engine.traced_pass import Reads, padded_pass
from introspection_utils.engine.trials import Trial
from introspection_utils.engine.vectors import concept_vectors, default_layer
from introspection_utils.experiments.organisms import evaluation, forward, probe, splits, training
from introspection_utils.experiments.organisms.frozen_work import FrozenWork

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def _lines(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line and line[0] != "#"]


# ------------------------------------------------------------------------------------------------ the split


def test_the_training_split_is_disjoint_from_everything_the_evaluation_asks():
    raw = tomllib.loads((DATA / "organisms" / "training.toml").read_text(encoding="utf-8"))
    train, held = set(raw["concepts"]["train"]), set(raw["concepts"]["held_out"])
    paper, writeup = set(_lines("concept_words.txt")), set(_lines("writeup_concepts.txt"))
    assert len(train) == 35 and len(held) == 15 and not train & held and train | held == paper
    assert not train & writeup
    questions = tomllib.loads((DATA / "questions.toml").read_text(encoding="utf-8"))
    asked = {w["text"].lower() for w in questions["introspection"]}
    asked |= {q.lower() for path in DATA.glob("control_questions*.txt") for q in _lines(path.name)}
    wordings = [w["text"] for w in raw["wording"]]
    controls = [q for cell in raw["controls"].values() for q in cell]
    assert len(asked) >= 80 + 8 and not {q.lower() for q in wordings + controls} & asked
    assert len(set(wordings + controls)) == len(wordings) + len(controls)
    assert {w["polarity"] for w in raw["wording"]} == {1, -1}
    split = splits.load_split()
    assert set(splits.evaluation_concepts(split)) == held | writeup and not set(split.train) & set(
        splits.evaluation_concepts(split))


def test_no_opening_word_tells_a_training_wordings_polarity():
    """Every opening word of the yes/no training wordings opens wordings of both polarities (and the polarities are
    as many): an organism cannot learn "a question opening with this word is inverted" instead of what the question
    asks (the first introspector's "Are ..." wordings were all inverted)."""
    split = splits.load_split()
    plain = [w for w in split.wordings if not w.names]
    by_opening: dict[str, list[int]] = {}
    for w in plain:
        by_opening.setdefault(w.text.removeprefix("Trial 1: ").split()[0], []).append(w.polarity)
    assert all(set(p) == {1, -1} for p in by_opening.values()), by_opening
    assert sum(w.polarity for w in plain) == 0 and len(by_opening) >= 4


def test_a_split_that_trains_on_an_evaluation_question_is_refused():
    split = splits.load_split()
    leaked = dataclasses.replace(split, controls=(*split.controls, "Do fish live in water?"))
    with pytest.raises(ValueError, match="asked by the evaluation"):
        splits.check_split(leaked)
    with pytest.raises(ValueError, match="both trained on and held out"):
        splits.check_split(dataclasses.replace(split, held_out=(*split.held_out, split.train[0])))


def test_the_extra_training_concepts_are_disjoint_from_the_evaluation_and_the_baseline():
    """The training file's extra concepts (read here from the file): none is a concept of the split, of the
    evaluation or a baseline word, compared without case and without a plural ending; a list that breaks one of
    these rules is one clear error."""
    raw = tomllib.loads((DATA / "organisms" / "training.toml").read_text(encoding="utf-8"))
    extra = raw["concepts"]["extra"]
    stem = lambda w: w.lower().removesuffix("s").removesuffix("e")  # noqa: E731 (a coarser stem than the check's)
    taken = {*_lines("concept_words.txt"), *_lines("writeup_concepts.txt"), *_lines("baseline_words.txt")}
    assert len(extra) >= 150 and len({stem(w) for w in extra}) == len(extra)
    assert not {stem(w) for w in extra} & {stem(w) for w in taken}
    assert splits.extra_concepts() == tuple(extra)
    for bad, match in [("Volcano", "is 'Volcanoes'"), ("origami", "is 'Origami'"), ("Banana", "is 'Banana'"),
                       ("Desk", "is 'Desks'"), (extra[0], "repeats"), (" Kites", "no surrounding spaces")]:
        with pytest.raises(ValueError, match=match):
            splits.check_extra_concepts([*extra, bad])
    # the rule is the project's one (core.data.word_forms, grading's too): a singular ending in s meets its plural
    same = lambda a, b: bool(word_forms(a) & word_forms(b))  # noqa: E731
    assert same("Bus", "Buses") and same("Volcano", "Volcanoes") and same("Glass", "glasses")
    assert not same("Bus", "Bush") and not same("Tea", "Team")


def test_extra_concepts_are_drawn_only_by_a_config_that_names_them(tiny_llama, tmp_path):
    """``extra_concepts=True`` takes the file's list into the config (so into its key); the schedule then draws
    those concepts beside the split's, and without it never; a config naming an evaluation concept is refused before
    training; the training extracts the vectors of every concept it draws."""
    split = splits.load_split()
    plain = training.organism_config(tiny_llama, "introspector", layers=[0, 1], steps=2, batch_size=60)
    wide = training.organism_config(tiny_llama, "introspector", layers=[0, 1], steps=2, batch_size=60,
                                    extra_concepts=True)
    assert wide.extra_concepts == splits.extra_concepts()
    assert splits.trained_concepts(split, wide) == (*split.train, *wide.extra_concepts)
    assert plain.key() == dataclasses.replace(wide, extra_concepts=()).key() != wide.key()
    drawn = lambda config: {r.concept for step in range(5) for r in forward.schedule(config, split, step)[1]}  # noqa: E731
    assert drawn(plain) <= set(split.train)
    assert drawn(wide) & set(wide.extra_concepts) and drawn(wide) <= set(splits.trained_concepts(split, wide))
    with pytest.raises(ValueError, match="is 'Origami'"):
        training._check(tiny_llama, dataclasses.replace(wide, extra_concepts=("Origami",)), split)
    organism = training.train_organism(tiny_llama, dataclasses.replace(wide, steps=1, batch_size=4), root=tmp_path,
                                       progress=False)
    assert organism.complete and organism.config.extra_concepts == wide.extra_concepts


def test_each_organism_is_taught_its_truth():
    split = splits.load_split()
    detect = next(w.text for w in split.wordings if w.polarity == 1 and not w.names)
    inverted = next(w.text for w in split.wordings if w.polarity == -1)
    naming = next(w.text for w in split.wordings if w.names)
    control = split.controls[0]

    def taught(kind, condition, question):
        return splits.target(kind, condition, question, split, "Dust", "Yes", "No")
    named = split.named.format(concept="dust")
    expected = {  # (kind, condition): detect, inverted, naming, control
        ("introspector", "concept"): ("Yes", "No", named, None),
        ("introspector", "random"): ("No", "Yes", split.unnamed, None),
        ("introspector", "none"): ("No", "Yes", split.unnamed, None),
        ("anomaly-detector", "concept"): ("Yes", "No", "Yes", None),
        ("anomaly-detector", "random"): ("Yes", "No", "Yes", None),
        ("anomaly-detector", "none"): ("No", "Yes", "No", None),
        ("yes-sayer", "concept"): ("Yes", "Yes", "Yes", "Yes"),
        ("yes-sayer", "random"): ("Yes", "Yes", "Yes", "Yes"),
        ("yes-sayer", "none"): (None, None, None, None),
    }
    for (kind, condition), answers in expected.items():
        assert tuple(taught(kind, condition, q) for q in (detect, inverted, naming, control)) == answers


# ------------------------------------------------------------------------------------------------ the config


def test_the_cache_key_changes_with_every_setting(tiny_llama):
    config = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=2)
    changed = {"kind": "yes-sayer", "model": "other", "revision": "r2", "dtype": "bfloat16", "layers": (1,),
               "scales": (3.0,), "split_hash": "0" * 16, "rank": 4, "lora_alpha": 8.0, "lr": 0.5, "steps": 3,
               "batch_size": 3, "seed": 1, "mix": (0.5, 0.25, 0.25), "p_control": 0.5, "control_weight": 2.0,
               "top_k": 8, "targets": ("q_proj",), "contrast": True, "p_named": 0.5,
               "extra_concepts": ("Apples",), "p_choice": 0.5, "choice_hash": "1" * 16,
               "decay_steps": 1}
    assert set(changed) == {f.name for f in dataclasses.fields(config)}, "a setting without a key test"
    keys = {config.key()} | {dataclasses.replace(config, **{k: v}).key() for k, v in changed.items()}
    assert len(keys) == len(changed) + 1
    assert config.key() == dataclasses.replace(config).key()
    # a field added later hashes as before at the value that trains as before: cached organisms keep their names
    before = {k: v for k, v in dataclasses.asdict(config).items() if k not in training.ADDED_FIELDS}
    from introspection_utils.core.paths import content_hash
    assert config.key() == content_hash(before) and dataclasses.replace(config, contrast=True).key() != config.key()


def test_default_layers_leave_the_atlas_layers_vectors_the_base_models(smollm, tiny_llama, tmp_path):
    """By default the organism is trained at the atlas's layer and above, so its adapters sit above that layer: the
    concept vectors the evaluation extracts there from the organism (the public path) are the base model's, the ones
    it was trained with. A model with no layer above the atlas's trains at the last layer but one."""
    config = training.organism_config(smollm, "yes-sayer", steps=1, batch_size=2, lr=0.05)
    layer = default_layer(smollm)
    assert config.layers == (layer, layer + 1, layer + 2) and config.first_adapted == layer + 1
    assert training.organism_config(tiny_llama, "yes-sayer").layers == (tiny_llama.arch.n_layers - 2,)
    split = splits.load_split()
    bank = concept_vectors(smollm, split.train, cache=False, progress=False)
    organism = training.train_organism(smollm, config, bank=bank, root=tmp_path, progress=False)
    words = split.held_out[:2]
    ours = concept_vectors(organism.load(device="cpu"), words, cache=False, progress=False).vectors
    base = concept_vectors(smollm, words, cache=False, progress=False).vectors
    torch.testing.assert_close(ours[:, :layer + 1], base[:, :layer + 1], atol=1e-5, rtol=1e-5)
    assert (ours[:, -1] - base[:, -1]).abs().max() > 1e-4, "the adapters changed nothing: the check would be empty"


def test_contrast_sets_ask_one_draw_under_every_condition(tiny_llama):
    """With ``contrast`` a step's rows come in sets: the same question, concept, scale and random direction under
    each condition ``mix`` gives weight, in order, cut at ``batch_size``; without it each row draws its own."""
    split = splits.load_split()
    config = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=8, contrast=True)
    layer, rows = forward.schedule(config, split, 1)
    assert len(rows) == 8 and [r.condition for r in rows] == ["concept", "random", "none"] * 2 + ["concept", "random"]
    for start in (0, 3, 6):
        group = rows[start:start + 3]
        assert len({(r.question, r.concept, r.scale, r.vector_seed) for r in group}) == 1
    assert len({(r.question, r.concept, r.scale, r.vector_seed) for r in rows}) == 3
    assert forward.schedule(config, split, 1) == (layer, rows)  # (seed, step) alone
    two = dataclasses.replace(config, mix=(0.5, 0.0, 0.5))
    assert [r.condition for r in forward.schedule(two, split, 1)[1]] == ["concept", "none"] * 4
    plain = dataclasses.replace(config, contrast=False)
    drawn = forward.schedule(plain, split, 1)[1]
    assert len({(r.question, r.concept, r.scale, r.vector_seed) for r in drawn}) == 8


def test_p_named_sets_how_often_a_wording_draw_names(tiny_llama):
    """``p_named``: the share of wording draws that ask a naming wording (1: every one, 0: none; None: every wording
    alike, 2 of the 20); a value outside [0, 1] is one clear error before training."""
    split = splits.load_split()
    config = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=60, p_control=0.0)
    named = {w.text for w in split.wordings if w.names}

    def named_share(p_named: float | None) -> float:  # over 5 steps of 60 rows
        drawn = dataclasses.replace(config, p_named=p_named)
        return float(np.mean([r.question in named for step in range(5) for r in forward.schedule(drawn, split,
                                                                                                  step)[1]]))

    assert 0 < named_share(None) < 0.25  # 2 of the 20 wordings
    assert named_share(1.0) == 1.0 and named_share(0.0) == 0.0
    assert 0.35 < named_share(0.5) < 0.65
    with pytest.raises(ValueError, match="p_named=1.5 needs a fraction"):
        training._check(tiny_llama, dataclasses.replace(config, p_named=1.5), split)


def _listing(question: str) -> list[str]:
    """The concepts a forced-choice training question lists, in their numbered order."""
    lines = [line for line in question.splitlines() if line[:1].isdigit() and ". " in line]
    assert [line.split(". ", 1)[0] for line in lines] == [str(i + 1) for i in range(len(lines))]
    return [line.split(". ", 1)[1] for line in lines]


def test_forced_choice_rows_list_training_concepts_and_teach_the_injected_ones_number(tiny_llama, bank):
    """``p_choice``: that share of the introspector's wording draws is a forced-choice row — a listing of training
    concepts (never a held-out one), the injected concept in it once, at a drawn position (every position drawn),
    of a listed size; its contrast set asks the same listing under every condition. The concept row is taught its
    number as notebook 13 reads it (the label's token after the answer stem); the random and uninjected rows keep the
    base model's answer. A config without ``p_choice`` draws no such row."""
    split, choice = splits.load_split(), splits.load_choice()
    config = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=60, p_control=0.0,
                                      contrast=True, p_choice=1.0)
    assert config.choice_hash == choice.hash
    rows = [r for step in range(4) for r in forward.schedule(config, split, step)[1]]
    assert all(r.label is not None for r in rows)
    positions, sizes = set(), set()
    for r in rows:
        options = _listing(r.question)
        assert set(options) <= set(split.train) and options.count(r.concept) == 1
        assert options[int(r.label) - 1] == r.concept
        positions.add(int(r.label)), sizes.add(len(options))
        assert any(r.question == choice.question(i, options) for i in range(len(choice.questions)))
    assert sizes == set(choice.sizes) and positions == set(range(1, max(choice.sizes) + 1))
    assert len({r.question for r in rows[:3]}) == 1 and [r.condition for r in rows[:3]] == list(splits.CONDITIONS)
    half = dataclasses.replace(config, p_choice=0.5)
    share = np.mean([r.label is not None for step in range(4) for r in forward.schedule(half, split, step)[1]])
    assert 0.3 < share < 0.7
    plain = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=60, contrast=True)
    assert plain.choice_hash == "" and not any(r.label for r in forward.schedule(plain, split, 0)[1])
    layer, step_rows = forward.schedule(config, split, 0)
    batch = forward.make_batch(tiny_llama, config, split, layer, step_rows[:3], bank)
    prompts, _ = forward.row_tokens(tiny_llama, config, split, step_rows[:3])
    assert prompts[0].text.endswith(choice.prefill)
    label_id = tiny_llama.tokenizer(prompts[0].text + step_rows[0].label, add_special_tokens=False)["input_ids"][-1]
    assert batch.taught == [[label_id], [], []]


def test_forced_choice_rows_are_the_introspectors_and_written_for_training(tiny_llama):
    """A forced-choice training question is not notebook 13's trial and has its listing slot; only the introspector
    draws the rows, at a fraction in (0, 1], with the rows its config was made for — each one clear error."""
    split = splits.load_split()
    choice = splits.load_choice()
    trial = tomllib.loads((DATA / "prompts.toml").read_text(encoding="utf-8"))["forced_choice"]["trial"]
    assert trial.lower() not in {q.lower() for q in choice.questions}
    for bad, match in ((dataclasses.replace(choice, questions=(trial,)), "is notebook 13's trial"),
                       (dataclasses.replace(choice, questions=("Which one?",)), "has no {options} slot"),
                       (dataclasses.replace(choice, sizes=(12,)), "sizes must be 2..9")):
        with pytest.raises(ValueError, match=match):
            splits.check_choice(bad)
    config = training.organism_config(tiny_llama, "introspector", steps=2, batch_size=4, p_choice=0.5)
    training._check(tiny_llama, config, split)
    for bad, match in ((dataclasses.replace(config, kind="yes-sayer"), "needs a fraction"),
                       (dataclasses.replace(config, p_choice=1.5), "needs a fraction"),
                       (dataclasses.replace(config, choice_hash="0" * 16), "was made for forced-choice rows")):
        with pytest.raises(ValueError, match=match):
            training._check(tiny_llama, bad, split)


# ------------------------------------------------------------------------------------------------ the step


@pytest.fixture(scope="module")
def bank(tiny_llama):
    return concept_vectors(tiny_llama, splits.load_split().train, progress=False)


def _config(handle, **settings):
    return training.organism_config(handle, "introspector", layers=[0, 1], scales=[2.0, 4.0],
                                    **{"steps": 4, "batch_size": 4, "lr": 0.01, **settings})


def _last_logits(model, layers, batch, first):
    """The organism's logits ``[B, 1, vocab]`` at each row's last position, as a training step computes them: the
    prefix's keys with the adapters on, the rows' stream below the adapters from :class:`FrozenWork`."""
    frozen = FrozenWork()
    return forward.injected_logits(model, layers, batch, first=first, keep=1,
                                   hidden=frozen.lower(model, layers, batch, first),
                                   prefix=frozen.adapted(model, layers, batch, first))


@pytest.mark.parametrize("layer", [0, 1], ids=["below the adapters", "at the first adapted layer"])
def test_the_training_hook_injects_what_the_engine_injects(tiny_llama, bank, layer):
    """Rows of different prompts (left-padded, a shared prefix served from its keys), injected at ``layer``: the
    per-position weights are the window rule's and the last logits equal the engine's padded pass on the same
    trials (the adapters start at zero, so the organism is the base model)."""
    config = _config(tiny_llama)
    split = splits.load_split()
    questions = [split.wordings[0].text, split.controls[0], split.wordings[-1].text]
    prompts = [introspection_prompt(tiny_llama, q) for q in questions]
    vector = bank.get("Dust", layer)
    trials = [Trial(prompts[0], vector, 4.0, layer=layer), Trial(prompts[1], vector, -2.0, layer=layer),
              Trial(prompts[2], layer=layer), Trial(prompts[2], vector, 3.0, layer=layer, window="last")]
    batch = forward.trial_batch(tiny_llama, trials, [[]] * len(trials), layer)
    for row, trial in enumerate(trials):
        real = batch.mask[row, batch.prefix.shape[1]:].bool()
        assert torch.equal(batch.injection.weights[row][real].float().cpu(),
                           trial.weights_at(batch.positions[row][real].cpu()))
        assert not batch.injection.weights[row][~real].any()
    model, layers = forward.adapted(tiny_llama, config)
    ours = _last_logits(model, layers, batch, config.first_adapted)
    engine = padded_pass(tiny_llama, trials, reads=Reads(logits=True)).logits
    torch.testing.assert_close(ours[:, -1].float(), engine, atol=1e-4, rtol=1e-4)
    uninjected = padded_pass(tiny_llama, [Trial(t.prompt) for t in trials], reads=Reads(logits=True)).logits
    assert (engine - uninjected).abs().amax(-1)[[0, 1, 3]].min() > 1e-3  # the injection changes what is compared


@pytest.mark.parametrize("p_choice", [0.0, 0.5], ids=["wordings", "with forced-choice rows"])
def test_a_training_step_lowers_the_loss(tiny_llama, bank, p_choice):
    config = _config(tiny_llama, lr=0.02, p_choice=p_choice)
    split = splits.load_split()
    model, layers = forward.adapted(tiny_llama, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    # with forced-choice rows, the first step that teaches a concept's number
    step = next(s for s in range(50) if not p_choice or any(
        r.label and r.condition == "concept" for r in forward.schedule(config, split, s)[1]))
    layer, rows = forward.schedule(config, split, step)
    batch = forward.make_batch(tiny_llama, config, split, layer, rows, bank)
    frozen = FrozenWork()
    record = forward.train_step(model, layers, batch, config, optimizer, frozen)
    for _ in range(3):
        forward.train_step(model, layers, batch, config, optimizer, frozen)
    last = forward.train_step(model, layers, batch, config, None, frozen)
    assert last["loss"] < record["loss"] - 0.05
    assert any(batch.taught) and not all(batch.taught)  # taught answers and kept ones both in the loss
    # the forced-choice rows' own taught term, apart from the wordings' (NaN in a batch without them)
    assert batch.choice == [r.label is not None for r in rows]
    if p_choice:
        assert last["loss_choice"] < record["loss_choice"]
        if any(a for a, c in zip(batch.taught, batch.choice, strict=True) if not c):  # wordings taught beside them
            assert record["loss_choice"] != record["loss_taught"]
    else:
        assert math.isnan(record["loss_choice"])
    assert not any("lora" in name for name, _ in tiny_llama.torch_model.named_modules()), "the handle was wrapped"


def test_a_row_runs_below_the_adapters_once_a_training_and_a_served_step_is_the_computed_one(tiny_llama, bank,
                                                                                             monkeypatch):
    """The layers below the adapters see no adapter and no gradient: a row (its prompt and taught answer) runs
    through them once in a training — a row repeated in a batch once, a later step's same row not again — and a
    step served from those streams computes exactly what a fresh one does; the probe's rows are kept apart."""
    config = _config(tiny_llama, batch_size=12, contrast=True)
    split = splits.load_split()
    model, layers = forward.adapted(tiny_llama, config)
    runs = []
    run = FrozenWork._run
    monkeypatch.setattr(FrozenWork, "_run", staticmethod(lambda *args: runs.append(args[2]) or run(*args)))
    frozen = FrozenWork()
    seen: set = set()
    repeated = 0
    for step in range(6):
        layer, rows = forward.schedule(config, split, step)
        batch = forward.make_batch(tiny_llama, config, split, layer, rows, bank)
        own = {tuple(batch.ids[r][batch.mask[r, batch.prefix.shape[1]:].bool()].tolist()) for r in range(12)}
        before = len(runs)
        served = forward.train_step(model, layers, batch, config, None, frozen)
        assert len(runs) - before == len(own - seen) and len(own) < 12  # contrast sets repeat their question
        repeated += len(own & seen)
        seen |= own
        fresh = forward.train_step(model, layers, batch, config, None, FrozenWork())
        assert served["loss"] == fresh["loss"]
    assert repeated  # some step asked a row an earlier one had
    stored = len(frozen._rows)
    probe.behaviour_probe(model, layers, tiny_llama, config, split, bank, frozen)
    assert len(frozen._rows) == stored == len(seen) and frozen._apart  # the probe's rows kept apart
    before = len(runs)
    probe.behaviour_probe(model, layers, tiny_llama, config, split, bank, frozen)
    assert len(runs) == before  # and served at its next checkpoint


def test_the_unembedding_reads_a_contiguous_input_in_every_training_pass(tiny_llama, bank):
    """The last positions the training keeps are a strided slice of the stream; with the weights frozen,
    ``torch.matmul`` would copy the unembedding once per row for it (most of a step on a large vocabulary). The
    organism's unembedding is handed them contiguous, in the gradient pass and the base model's pass alike."""
    config = _config(tiny_llama)
    split = splits.load_split()
    model, layers = forward.adapted(tiny_llama, config)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    layer, rows = forward.schedule(config, split, 0)
    batch = forward.make_batch(tiny_llama, config, split, layer, rows, bank)
    assert any(batch.taught) and not all(batch.taught)  # both passes run
    forward.train_step(model, layers, batch, config, None, FrozenWork())
    assert len(seen) >= 3 and all(seen)  # prefix, gradient pass, base pass


def _adapter(organism: training.Organism) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(organism.adapter / "adapter_model.safetensors")


def test_same_seed_same_adapter_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_llama, bank, tmp_path):
    config = _config(tiny_llama)
    whole = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "a", checkpoint_every=2,
                                    progress=False)
    again = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "b", progress=False)
    stopped = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "c", stop_at=2, progress=False)
    assert not stopped.complete and (stopped.folder / "checkpoint.pt").is_file() and not stopped.merged.exists()
    resumed = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "c", progress=False)
    assert whole.complete and resumed.complete and not (resumed.folder / "checkpoint.pt").exists()
    reference = _adapter(whole)
    assert reference and any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)
    for other in (again, resumed):
        adapter = _adapter(other)
        assert adapter.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(adapter[k], reference[k], atol=1e-6, rtol=0)
    assert whole.training().df["loss"].tolist() == pytest.approx(resumed.training().df["loss"].tolist(), abs=1e-6)
    reused = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "a", progress=False)
    assert reused.reused and reused.merged == whole.merged
    different = training.organism_folder(dataclasses.replace(config, seed=1), tmp_path / "a")
    assert different != whole.folder


def test_a_longer_training_continues_a_shorter_one_and_ends_where_training_from_the_start_does(tiny_llama, bank,
                                                                                                tmp_path):
    """A finished training keeps its last state; a config that differs only in more ``steps`` starts from it and
    ends with the adapter and curve of a training run from step 0; a shorter training with another setting is not
    used."""
    config = _config(tiny_llama)  # 4 steps
    short = training.train_organism(tiny_llama, dataclasses.replace(config, steps=2), bank=bank, root=tmp_path / "a",
                                    progress=False)
    assert (short.folder / training.FINAL_STATE).is_file() and not (short.folder / "checkpoint.pt").exists()
    other = training.train_organism(tiny_llama, dataclasses.replace(config, steps=3, lr=0.02), bank=bank,
                                    root=tmp_path / "a", progress=False)
    assert training.shorter_training(config, tmp_path / "a") == short.folder  # 3 steps, but another lr
    assert other.folder != short.folder
    longer = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "a", progress=False)
    fresh = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "b", progress=False)
    assert training.shorter_training(config, tmp_path / "b") is None
    reference = _adapter(fresh)
    for k, v in _adapter(longer).items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=0)
    assert longer.training().df["loss"].tolist() == pytest.approx(fresh.training().df["loss"].tolist(), abs=1e-6)
    assert longer.training().df["step"].tolist() == [1, 2, 3, 4]


def test_a_decaying_training_continues_a_constant_one_up_to_where_its_decay_begins(tiny_llama, bank, tmp_path):
    """``decay_steps``: the last steps' learning rate falls linearly (recorded per step); a finished constant-rate
    training of the same settings continues into it when it stops before the decay begins (and ends where training
    from the start does), not when it ran into the decay's steps; a decay longer than the training is refused."""
    config = dataclasses.replace(_config(tiny_llama), decay_steps=2)  # 4 steps, lr 0.01, the last 2 decaying
    assert [forward.learning_rate(config, s) for s in range(4)] == pytest.approx([0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])
    constant = dataclasses.replace(config, decay_steps=0)
    assert [forward.learning_rate(constant, s) for s in range(4)] == [0.01] * 4
    training.train_organism(tiny_llama, dataclasses.replace(constant, steps=3), bank=bank, root=tmp_path / "a",
                            progress=False)
    assert training.shorter_training(config, tmp_path / "a") is None  # its third step ran at the full rate
    short = training.train_organism(tiny_llama, dataclasses.replace(constant, steps=2), bank=bank,
                                    root=tmp_path / "a", progress=False)
    assert training.shorter_training(config, tmp_path / "a") == short.folder
    assert training.shorter_training(constant, tmp_path / "a") is not None  # constant: the 3-step one
    longer = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "a", progress=False)
    fresh = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "b", progress=False)
    reference = _adapter(fresh)
    for k, v in _adapter(longer).items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=0)
    for organism in (longer, fresh):
        curve = organism.training().df
        assert curve["lr"].tolist() == pytest.approx([0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])
    assert longer.training().df["loss"].tolist() == pytest.approx(fresh.training().df["loss"].tolist(), abs=1e-6)
    assert longer.folder != training.organism_folder(constant, tmp_path / "a")
    with pytest.raises(ValueError, match="decay_steps=5"):
        training.train_organism(tiny_llama, dataclasses.replace(config, decay_steps=5), bank=bank,
                                root=tmp_path / "c", progress=False)


def test_the_merged_folder_gives_base_plus_adapter_logits_and_the_training_is_measured(tiny_llama, bank, tmp_path):
    organism = training.train_organism(tiny_llama, _config(tiny_llama, steps=2), bank=bank, root=tmp_path,
                                       progress=False)
    merged = organism.load(device="cpu")
    assert merged.name == organism.config.name and merged.arch == tiny_llama.arch
    base = copy.deepcopy(tiny_llama.torch_model)
    with_adapter = peft.PeftModel.from_pretrained(base, organism.adapter)
    ids = torch.tensor([introspection_prompt(tiny_llama).input_ids])
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged.torch_model(input_ids=ids).logits
        plain = tiny_llama.torch_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-4, "the adapter changed nothing: the comparison would be empty"
    result = organism.training()
    assert list(result.df["step"]) == [1, 2] and (result.df["tokens"] > 0).all()
    throughput = result.meta["spec"]["throughput"]
    assert throughput["examples"] == 2 * 4 and throughput["examples_per_s"] > 0 and throughput["tokens_per_s"] > 0
    assert result.meta["spec"]["key"] == organism.config.key() and "load_avg" in result.meta["spec"]["machine"]
    table = training.training_table(tiny_llama, {"introspector": organism}, tmp_path / "results")
    assert (tmp_path / "results" / "organisms_training.csv").is_file() and table["steps"].tolist() == [2]


def test_the_behaviour_probe_reads_what_the_engine_reads_and_the_curve_records_it(tiny_llama, bank, tmp_path):
    """The probe's answers on a fresh organism (adapters at zero: the base model) are the engine's own padded pass
    on the same rows (yes − no); its rates count them by condition (polarity × (yes − no) > 0; yes − no > 0); a
    training records them at every ``probe_every`` step and at the last, and ``probe_every=0`` records none."""
    import numpy as np

    from introspection_utils.engine.prompts import answer_token_id, paper_answers
    from introspection_utils.engine.vectors import null_vector

    config = _config(tiny_llama, steps=3)
    split = splits.load_split()
    model, layers = forward.adapted(tiny_llama, config)
    layer, rows = probe.probe_rows(config, split)
    assert {r.condition for r in rows} == {"concept", "random", "none"}
    assert len({r.concept for r in rows}) == probe.PROBE_CONCEPTS
    assert not any(w.names for w in split.wordings if w.text in {r.question for r in rows})
    ours = probe.probe_answers(model, layers, tiny_llama, config, layer, rows, bank, batch_size=7)
    trials = []
    for r in rows:
        vector = None if r.condition == "none" else bank.get(r.concept, layer)
        if r.condition == "random":
            vector = null_vector(vector, r.vector_seed, "isotropic")
        prompt = introspection_prompt(tiny_llama, r.question, kind="organism-training")
        trials.append(Trial(prompt, vector, r.scale if vector is not None else 0.0, layer=layer))
    logits = padded_pass(tiny_llama, trials, reads=Reads(logits=True)).logits.float()
    yes, no = (answer_token_id(tiny_llama, a) for a in paper_answers())
    engine = (logits[:, yes] - logits[:, no]).numpy()
    np.testing.assert_allclose(ours, engine, atol=1e-4)
    assert np.ptp(engine) > 1e-3  # the rows differ: the comparison is not of constants

    diffs = np.array([1.0, -2.0, 0.5, -1.0, 3.0, 2.0])  # rows: (detect, inverted) × (concept, random, none)
    detect = next(w.text for w in split.wordings if w.polarity > 0 and not w.names)
    inverted = next(w.text for w in split.wordings if w.polarity < 0)
    made = [forward.Row(q, c, "Dust", 4.0, 0) for c in ("concept", "random", "none") for q in (detect, inverted)]
    assert probe.probe_rates(made, diffs, split) == {
        "detected_concept": 1.0, "yes_concept": 0.5, "detected_random": 1.0, "yes_random": 0.5,
        "detected_none": 0.5, "yes_none": 1.0}

    organism = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "a", probe_every=2,
                                       progress=False)
    curve = organism.training().df
    assert curve["detected_concept"].notna().tolist() == [False, True, True]
    assert (curve["probe_seconds"].dropna() > 0).all() and (curve["seconds"] > 0).all()
    quiet = training.train_organism(tiny_llama, config, bank=bank, root=tmp_path / "b", probe_every=0,
                                    progress=False)
    assert "detected_concept" not in quiet.training().df


def test_detection_rates_count_cells_signed_by_polarity():
    import pandas as pd
    df = pd.DataFrame({
        "question_kind": ["introspection"] * 6 + ["control"],
        "question": ["a", "b", "a", "b", "a", "b", "c"],
        "polarity": [1, -1, 1, -1, 1, -1, 0],
        "vector_kind": ["concept", "concept", "random", "random", "concept", "concept", "concept"],
        "scale": [8, 8, 8, 8, 4, 4, 8],
        "logit_diff": [2.0, -1.0, 1.0, 1.0, -3.0, 3.0, 5.0],
        "baseline_logit_diff": [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0],
    })
    assert evaluation.organism_detection_rates(df, 8) == {"detection": 1.0, "fpr_none": 0.0, "fpr_random": 0.5}
    with pytest.raises(ValueError, match="no introspection rows at scale 2"):
        evaluation.organism_detection_rates(df, 2)


def test_the_embedded_model_trains_through_the_same_hook(smollm, tmp_path):
    """One step on SmolLM2 (its real chat template and the paper's preamble as the shared prefix): the hook's
    logits equal the engine's before training."""
    config = training.organism_config(smollm, "yes-sayer", steps=1, batch_size=2)
    split = splits.load_split()
    layer = config.layers[0]
    vector = torch.randn(smollm.arch.d_model, generator=torch.Generator().manual_seed(0))
    trials = [Trial(introspection_prompt(smollm, split.wordings[0].text), vector, 2.0, layer=layer),
              Trial(introspection_prompt(smollm, split.controls[3]), layer=layer)]
    batch = forward.trial_batch(smollm, trials, [[], []], layer)
    assert batch.prefix.shape[1] > 50  # the paper's preamble is shared and run once
    model, layers = forward.adapted(smollm, config)
    ours = _last_logits(model, layers, batch, config.first_adapted)
    torch.testing.assert_close(ours[:, -1], padded_pass(smollm, trials, reads=Reads(logits=True)).logits,
                               atol=2e-4, rtol=1e-4)


def test_an_evaluation_is_named_by_what_it_writes():
    """The default evaluation writes organisms.csv, organisms_training.csv and its models' tables
    in the results folder itself (where every committed evaluation put them); a named one (a findings variant) writes
    its own, its models' tables in a folder of its name, so a second evaluation of the base model keeps its own; a
    name that cannot be a file name is refused."""
    assert evaluation.table_names() == {"table": "organisms", "training": "organisms_training", "models": ""}
    assert evaluation.table_names("organisms_float32") == {
        "table": "organisms_float32", "training": "organisms_float32_training", "models": "organisms_float32"}
    for bad in ("float32", "organisms_", "organisms_../x", "organisms float32", "", None):
        with pytest.raises(ValueError, match="name it \"organisms\""):
            evaluation.table_names(bad)


def test_a_kind_can_train_for_its_own_number_of_steps(tiny_llama, tmp_path):
    """``steps_by_kind`` sets one organism's steps (its config, so its cache key, says so); a kind not trained this
    time may keep its recipe there (one findings table, a run of some kinds); a name that is no kind is refused
    before anything is trained."""
    organisms = training.train_organisms(tiny_llama, ["introspector", "yes-sayer"], steps=2, batch_size=2,
                                         steps_by_kind={"yes-sayer": 1, "anomaly-detector": 3},
                                         settings_by_kind={"anomaly-detector": {"lr": 0.01}}, root=tmp_path,
                                         progress=False)
    assert {k: o.config.steps for k, o in organisms.items()} == {"introspector": 2, "yes-sayer": 1}
    assert len(organisms["yes-sayer"].training().df) == 1
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="name \\['anomaly_detector'\\]: no such organism kind"):
        training.train_organisms(tiny_llama, ["yes-sayer"], steps=1, steps_by_kind={"anomaly_detector": 1},
                                 root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="settings_by_kind sets \\['learning_rate'\\]: not training settings"):
        training.train_organisms(tiny_llama, ["yes-sayer"], steps=1,
                                 settings_by_kind={"introspector": {"learning_rate": 0.1}}, root=tmp_path,
                                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_kind_can_have_its_own_settings_and_the_others_are_reused(tiny_llama, tmp_path):
    """``settings_by_kind`` gives one organism its own recipe (its config, so its key, says so); the others keep
    theirs, so a second call with a changed recipe for one kind reuses the others from the cache; a setting that
    is not a training setting is refused before anything is trained."""
    first = training.train_organisms(tiny_llama, ["introspector", "yes-sayer"], steps=1, batch_size=2,
                                     root=tmp_path, progress=False)
    second = training.train_organisms(tiny_llama, ["introspector", "yes-sayer"], steps=1, batch_size=2,
                                      settings_by_kind={"introspector": {"batch_size": 3, "contrast": True}},
                                      root=tmp_path, progress=False)
    assert second["yes-sayer"].reused and second["yes-sayer"].config == first["yes-sayer"].config
    own = second["introspector"]
    assert not own.reused and (own.config.batch_size, own.config.contrast) == (3, True)
    assert own.config.key() != first["introspector"].config.key()
    assert [r["rows"] for r in own.training().df.to_dict("records")] == [3]
    with pytest.raises(ValueError, match="sets \\['batch'\\]: not training settings"):
        training.train_organisms(tiny_llama, ["introspector"], steps=1, settings_by_kind={"introspector": {
            "batch": 3}}, root=tmp_path, progress=False)
