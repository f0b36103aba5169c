"""jaxtrain.plot: curves read from metrics.jsonl are the ones drawn; the CLI writes a PNG."""

import json
import math
import os

import numpy as np
import pytest

from jaxtrain import plot
from jaxtrain.writers import JsonlWriter


def _run(path, records):
    w = JsonlWriter(os.path.join(path, "metrics.jsonl"))
    for step, split, m in records:
        w.write(step, split, m)
    w.close()
    return str(path)


@pytest.fixture
def runs(tmp_path):
    a = _run(tmp_path / "exp" / "a", [
        (10, "train", {"loss": 2.0, "accuracy": 0.3, "lr": 0.1}),
        (20, "train", {"loss": 1.0, "accuracy": 0.6, "lr": 0.1}),
        (20, "val", {"loss": 1.2, "accuracy": 0.5}),
        (30, "train", {"loss": 0.5, "accuracy": 0.8, "lr": 0.1}),
        (20, "train", {"loss": 0.9, "accuracy": 0.65, "lr": 0.1}),  # resumed: rewrites step 20
        (40, "val", {"loss": 0.7, "accuracy": 0.75}),
        (40, "test", {"loss": 0.8, "accuracy": 0.7}),
    ])
    b = _run(tmp_path / "other" / "a", [  # same basename as run a
        (10, "train", {"seed": 0, "loss": 3.0, "accuracy": 0.2}),
        (10, "train", {"seed": 1, "loss": 1.0, "accuracy": 0.4}),
        (20, "train", {"seed": 0, "loss": float("nan"), "accuracy": 0.5}),
        (20, "train", {"seed": 1, "loss": 0.5, "accuracy": 0.7}),
    ])
    return a, b


def test_load_curves(runs):
    a, b = runs
    ca = plot.load_curves(a)
    steps, values = ca[("train", "loss")]
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_array_equal(values[:, 0], [2.0, 0.9, 0.5])  # last write of step 20 wins
    assert ca[("test", "accuracy")][1].tolist() == [[0.7]]
    steps, values = plot.load_curves(b)[("train", "loss")]
    assert values.shape == (2, 2)  # [steps, seeds]
    assert values[0].tolist() == [3.0, 1.0] and math.isnan(values[1, 0])  # "nan" string read back


def test_draw_shows_each_run_split_and_metric(runs):
    a, b = runs
    fig = plot.draw([a, b], metrics=("loss", "accuracy"))
    loss_ax, acc_ax = fig.axes[:2]
    assert [loss_ax.get_title(), acc_ax.get_title()] == ["loss", "accuracy"]
    assert loss_ax.get_xlabel() == "step" and acc_ax.get_ylabel() == "accuracy"
    assert loss_ax.get_yscale() == "log"
    lines = {ln.get_label(): ln for ln in acc_ax.lines}
    # run labels are the shortest path tails that tell the runs apart
    assert set(lines) == {"exp/a train", "exp/a val", "exp/a test",
                          "other/a train (mean of 2 seeds)"}
    np.testing.assert_array_equal(lines["exp/a val"].get_xdata(), [20, 40])
    np.testing.assert_array_equal(lines["exp/a val"].get_ydata(), [0.5, 0.75])
    np.testing.assert_allclose(lines["other/a train (mean of 2 seeds)"].get_ydata(), [0.3, 0.6])
    seed_loss = {ln.get_label(): ln for ln in loss_ax.lines}["other/a train (mean of 2 seeds)"]
    np.testing.assert_allclose(seed_loss.get_ydata(), [2.0, 0.5])  # nanmean skips the NaN seed
    # one figure legend listing every entry, same color per run across splits
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    assert "exp/a test" in names and "other/a train min-max over seeds" in names
    assert lines["exp/a train"].get_color() == lines["exp/a val"].get_color()
    assert lines["exp/a train"].get_color() != lines["other/a train (mean of 2 seeds)"].get_color()
    assert "exp/a" in fig._suptitle.get_text()


def test_cli_writes_png(runs, tmp_path, capsys):
    import matplotlib.image

    a, b = runs
    out = tmp_path / "figs" / "curves.png"
    assert plot.main([a, b, "--out", str(out), "--labels", "base", "seeds"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(str(out)).shape
    assert w > 2 * h > 600  # two panels side by side, readable size
    assert plot.main([a]) == 0  # one run: defaults to RUN/curves.png
    assert os.path.isfile(os.path.join(a, "curves.png"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"note": 1}) + "\n")
    assert plot.main([str(empty)]) == 2
    assert "no metrics to plot" in capsys.readouterr().err
