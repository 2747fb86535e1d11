"Parity with the reference code (PyCIL, PROOF, ENGINE) on the details a first real run would otherwise get wrong."
import numpy as np
import pytest

from spa_toolkit.metrics import accuracy_matrix, forgetting, old_new_harmonic


def test_forgetting_is_pycils_by_default():
    "PyCIL: np.max(acctable, axis=1) - acctable[:, task], the best *including* the latest evaluation: never negative."
    acc = np.array([[80.0, np.nan, np.nan], [70.0, 90.0, np.nan], [75.0, 95.0, 60.0]])
    table = np.nan_to_num(acc).T  # PyCIL's acctable: rows = groups, columns = tasks, zeros where not yet seen
    pycil = np.mean((np.max(table, axis=1) - table[:, 2])[:2])
    assert forgetting(acc) == pytest.approx(pycil) == 2.5
    assert forgetting(acc, "avalanche") == pytest.approx(0.0)  # 5 for task 0, -5 for task 1


def test_old_new_and_matrix_rounded_as_pycil_rounds():
    "PyCIL rounds grouped, old and new accuracies with np.around(correct * 100 / n, 2)."
    preds, labels = np.array([0, 1, 1, 2, 3, 3, 3]), np.array([0, 0, 1, 2, 2, 3, 3])
    o = old_new_harmonic(preds, labels, n_old=2)
    assert (o.old, o.new, o.harmonic) == (66.67, 75.0, 70.59)
    assert accuracy_matrix([preds], [labels], [[0, 1, 2, 3]])[0, 0] == 71.43


def test_engine_sentences_phrased_as_clauses():
    "ENGINE's files hold sentences; inside the template they read as clauses (case and final punctuation normalised)."
    from spa_toolkit.patches import sem_prompts
    engine = {"apple": ["Typically round or oval shape.", "Smooth, shiny skin!"]}
    assert sem_prompts("apple", engine, "a photo of a {c}, which has {s}.") == ["a photo of a apple, which has typically round or oval shape.",
                                                                             "a photo of a apple, which has smooth, shiny skin."]
    assert sem_prompts("apple", engine) == ["typically round or oval shape", "smooth, shiny skin"]  # the default: the description alone


def test_descriptions_default_to_the_papers_model_and_the_object():
    "The paper used GPT-5; the prompt asks for the object's visual attributes, not its surroundings."
    import inspect
    from spa_toolkit.descriptions import LLMSettings, describe_benchmark, describe_run, prompt_text
    assert LLMSettings().model == "gpt-5"
    assert {inspect.signature(f).parameters["model"].default for f in (describe_run, describe_benchmark)} == {"gpt-5"}
    text = prompt_text("red fox")
    assert "not its background or surroundings" in text and "typical surroundings" not in text
