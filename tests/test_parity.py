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
