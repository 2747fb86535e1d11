"Tests of spa_toolkit.metrics: PyCIL's curve arithmetic on PROOF's published curve, the matrix metrics, results files, reports."
import json, math, sys

import numpy as np
import pytest

from spa_toolkit.core import SpaError
from spa_toolkit.metrics import (RunResult, accuracy, accuracy_curve, accuracy_matrix, average_accuracy, forgetting, forgetting_matrix,
                                 last_accuracy, markdown_table, old_new_harmonic, per_task_accuracy, plot_curves, topk_accuracy)

PROOF_CIFAR_B0 = [97.80, 93.70, 91.53, 88.38, 86.60, 85.27, 84.30, 81.22, 79.82, 79.11]  # published.md


def test_proof_curve_average_and_last():
    assert average_accuracy(PROOF_CIFAR_B0) == pytest.approx(86.773, abs=1e-9)
    assert last_accuracy(PROOF_CIFAR_B0) == 79.11


def test_average_is_mean_of_rounded_curve():
    raw = [90.004, 80.006]  # rounds to 90.0 and 80.01
    assert accuracy_curve(raw) == [90.0, 80.01]
    assert average_accuracy(raw) == pytest.approx(85.005, abs=1e-12)


def test_pycil_rounding_of_seen_accuracy():
    "PyCIL: np.around(correct * 100 / n, 2); 2 of 3 right is 66.67."
    preds, labels = np.array([0, 1, 5]), np.array([0, 1, 2])
    scores = np.eye(6)[preds]
    assert accuracy_curve([topk_accuracy(scores, labels)]) == [66.67]


def test_matrix_from_predictions_and_forgetting():
    splits = [[0, 1], [2, 3], [4, 5]]
    labels = [np.array([0, 1]), np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3, 4, 5])]
    preds = [np.array([0, 1]), np.array([0, 2, 2, 3]), np.array([2, 2, 2, 3, 4, 5])]
    A = accuracy_matrix(preds, labels, splits)
    expect = np.array([[100, np.nan, np.nan], [50, 100, np.nan], [0, 100, 100]])
    np.testing.assert_allclose(A, expect, equal_nan=True)
    np.testing.assert_allclose(forgetting_matrix(A)[2, :2], [100, 0])
    assert forgetting(A) == pytest.approx(50.0)


def test_forgetting_matches_avalanche_unit_test():
    vals = [[1.0, 0.0, 0.0], [0.5, 0.8, 1.0], [0.2, 1.0, 0.5]]
    target = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.8, -0.2, 0.0]]
    F = forgetting_matrix(vals, "avalanche")
    low = np.tril_indices(3, -1)
    np.testing.assert_allclose(F[low], np.array(target)[low])


def test_per_task_accuracy_nan_for_unseen_and_empty():
    out = per_task_accuracy([0, 1], [0, 1], [[0], [1], [2]], upto=1)
    assert out[:2].tolist() == [100.0, 100.0] and math.isnan(out[2])
    assert math.isnan(per_task_accuracy([0], [0], [[0], [1]])[1])  # task 1 has no test images here


def test_old_new_harmonic():
    o = old_new_harmonic(np.array([0, 0, 2, 3]), np.array([0, 1, 2, 3]), n_old=2)
    assert (o.old, o.new) == (50.0, 100.0)
    assert o.harmonic == 66.67  # PyCIL's rounding
    assert old_new_harmonic([1, 1], [0, 1], n_old=1).harmonic == 0.0


def test_bad_inputs():
    with pytest.raises(SpaError, match="empty accuracy curve"): average_accuracy([])
    with pytest.raises(SpaError, match="square"): forgetting(np.zeros((2, 3)))
    with pytest.raises(SpaError, match="one prediction per label"): old_new_harmonic([0], [0, 1], 1)


def make_result(curve=PROOF_CIFAR_B0, method="proof"):
    T = len(curve)
    A = np.tril(np.full((T, T), 90.0)); A[np.triu_indices(T, 1)] = np.nan
    return RunResult(method, "cifar100", f"B0Inc{100 // T}", list(curve), A.tolist(), [100 // T * (t + 1) for t in range(T)],
                     list(range(100)), knobs=dict(lr=0.01, epochs=5), timings=dict(total=1.0))


def test_result_json_roundtrip(tmp_path):
    r = make_result()
    r.save(tmp_path/"r.json")
    d = json.loads((tmp_path/"r.json").read_text())  # strict JSON: no NaN tokens
    assert d["matrix"][0][1] is None and d["average"] == pytest.approx(86.773)
    assert set(d) >= {"curve", "matrix", "knobs", "versions", "class_order", "timings"}
    back = RunResult.load(tmp_path/"r.json")
    assert back.curve == r.curve and back.knobs == r.knobs and back.versions == r.versions
    np.testing.assert_allclose(back.matrix, r.matrix, equal_nan=True)


def test_load_foreign_file(tmp_path):
    (tmp_path/"x.json").write_text('{"hello": 1}')
    with pytest.raises(SpaError, match="not a RunResult file"): RunResult.load(tmp_path/"x.json")


def test_markdown_table():
    lines = markdown_table({"PROOF": make_result(), "worse": make_result([c - 1 for c in PROOF_CIFAR_B0])}).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| PROOF | cifar100 | B0Inc10 | 10 | 86.77 | 79.11 | 0.00 |")
    assert "| 85.77 | 78.11 |" in lines[3]


def test_plot_curves_png(tmp_path):
    out = plot_curves({"a": make_result(), "b": make_result([c - 3 for c in PROOF_CIFAR_B0])}, tmp_path/"sub"/"c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["c.png"]


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    for m in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]: monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SpaError, match=r"pip install 'spa_toolkit\[plot\]'"): plot_curves({"a": make_result()}, tmp_path/"c.png")
    assert not (tmp_path/"c.png").exists()


def test_accuracy_rounds_ties_like_pycil():
    "PyCIL rounds np.around(correct * 100 / n, 2); a mean taken first rounds some ties the other way (3857 of 4000: 96.43)."
    labels = np.zeros(4000, dtype=int)
    preds = np.where(np.arange(4000) < 3857, 0, 1)
    assert accuracy_curve([accuracy(preds, labels)]) == [96.42]



def test_forgetting_when_a_task_improves_after_it_is_learned():
    "Task 0 is learned at 50 %, rises to 80 % after task 1 (backward transfer), then drops to 60 %: it forgot 20 points."
    A = np.array([[50.0, np.nan, np.nan], [80.0, 70.0, np.nan], [60.0, 90.0, 40.0]])
    assert forgetting_matrix(A)[2, 0] == 20.0  # the best accuracy over time, not the one just after learning (that gives -10)
    # task 1 rose from 70 to 90: best earlier accuracy gives -20, PyCIL's best including the latest gives 0
    assert forgetting(A) in (0.0, 10.0)


def test_average_of_the_rounded_curve_where_rounding_matters():
    curve = [10.004, 10.004, 10.007]  # rounded 10.00, 10.00, 10.01
    assert average_accuracy(curve) == pytest.approx((10.0 + 10.0 + 10.01) / 3, abs=1e-12)
    assert average_accuracy(curve) != pytest.approx(np.mean(curve), abs=1e-4)  # not the mean of the raw curve
    assert average_accuracy(curve) != pytest.approx(round(float(np.mean(curve)), 2), abs=1e-4)  # nor the rounded mean


def test_curve_figure_keeps_the_legend_off_the_curves_and_ticks_whole_classes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import spa_toolkit.metrics as metrics
    from matplotlib.figure import Figure
    figs = []
    class Recorded(Figure):
        def __init__(self, *a, **k): super().__init__(*a, **k); figs.append(self)
    monkeypatch.setattr(metrics, "figure_class", lambda: Recorded)
    r = RunResult("spa", "toy", "B0Inc1", [90.0, 80.0, 70.0], [], [1, 2, 3], [])
    plot_curves({"spa": r, "ncm": RunResult("ncm", "toy", "B0Inc1", [95.0, 85.0, 75.0], [], [1, 2, 3], [])}, tmp_path / "c.png")
    (fig,) = figs
    ax = fig.axes[0]
    box, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
    assert not box.overlaps(legend)  # the legend lies outside the plotting area
    assert all(float(t).is_integer() for t in ax.get_xticks())
