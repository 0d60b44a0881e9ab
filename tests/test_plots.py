"""python -m guided.cli.plots: the paper's trade-off figures over one or several sweep folders, and their data."""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from guided.errors import GuidedError
from guided.cli.plots import main
from guided.evaluation.plots import plot_sweep, tradeoff
from guided.evaluation.sweeps import save_results

PNG = b"\x89PNG\r\n\x1a\n"


def make_sweep(folder, shift=0.0, features=("digits16", "fid"), num_samples=100, metrics=None):
    """A sweep folder with known numbers: 3 scales x 2 seeds."""
    folder.mkdir(parents=True)
    runs = []
    for scale in (0.0, 1.0, 4.0):
        for j, seed in enumerate((0, 100)):
            row = {"scale": scale, "seed": seed, "precision": 0.5 + 0.1 * scale / 4 + 0.01 * j,
                   "recall": 0.9 - 0.1 * scale / 4 - 0.02 * j, features[1]: 50 - 5 * scale + shift + j,
                   "inception_score": 6 + scale / 2 + j * 0.5, "num_samples": num_samples}
            runs.append({k: v for k, v in row.items() if metrics is None or k in metrics or k in
                         ("scale", "seed", "num_samples")})
    settings = {"sweep": "scale", "num_samples": num_samples, "reference": {"data": "digits"}}
    results = save_results(folder, settings, runs, SimpleNamespace(name=features[0], fd_key=features[1]))
    plot_sweep(folder / "sweep.png", results)  # as the sweep's loop does after each run
    return folder


def test_one_sweep_gives_both_panels_and_the_numbers_behind_them(tmp_path):
    a = make_sweep(tmp_path / "a")
    assert (a / "sweep.png").read_bytes()[:8] == PNG
    warnings = tradeoff([a], tmp_path / "fig.png")
    assert warnings == [] and (tmp_path / "fig.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader(open(tmp_path / "fig.csv")))
    assert [float(r["value"]) for r in rows] == [0, 1, 4] and {r["method"] for r in rows} == {"a"}
    four = rows[2]
    assert float(four["fid_mean"]) == pytest.approx(30.5)
    assert float(four["fid_std"]) == pytest.approx(np.std([30, 31], ddof=1))
    assert float(four["precision_mean"]) == pytest.approx(0.605) and four["seeds"] == "2"
    data = json.loads((tmp_path / "fig.json").read_text())
    assert len(data["points"]) == 3 and data["points"][0]["param"] == "scale"


def test_several_methods_overlay_with_labels(tmp_path, capsys):
    a, b = make_sweep(tmp_path / "a"), make_sweep(tmp_path / "b", shift=-10)
    assert main([str(a), str(b), "--out", str(tmp_path / "both.png"), "--labels", "classifier,cfg"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "both.csv")))
    assert [r["method"] for r in rows] == ["classifier"] * 3 + ["cfg"] * 3
    assert float(rows[3]["fid_mean"]) == pytest.approx(float(rows[0]["fid_mean"]) - 10)


def test_sweeps_in_other_feature_spaces_are_refused_and_other_counts_warned(tmp_path, capsys):
    a = make_sweep(tmp_path / "a")
    inc = make_sweep(tmp_path / "inc", features=("inception", "fid"))
    assert main([str(a), str(inc), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the sweeps were measured in different feature spaces") and "\n" not in err
    more = make_sweep(tmp_path / "more", num_samples=1000)
    warnings = tradeoff([a, more], tmp_path / "y.png")
    assert any("differ in sample counts (100, 1000)" in w for w in warnings)


def test_fd_dinov2_sweeps_draw_precision_recall_only(tmp_path):
    d = make_sweep(tmp_path / "d", features=("dinov2", "fd_dinov2"), metrics=("precision", "recall", "fd_dinov2"))
    warnings = tradeoff([d], tmp_path / "d.png")
    assert any("no Inception Score" in w for w in warnings) and (tmp_path / "d.png").read_bytes()[:8] == PNG
    assert "fd_dinov2_mean" in (tmp_path / "d.csv").read_text()


def test_bad_folders_and_names_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GuidedError, match="holds no results.json"):
        tradeoff([tmp_path / "empty"], tmp_path / "f.png")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text('[{"scale": "0"}]')
    with pytest.raises(GuidedError, match="rerun the sweep"):
        tradeoff([tmp_path / "old"], tmp_path / "f.png")
    with pytest.raises(GuidedError, match="give a .png"):
        tradeoff([tmp_path / "old"], tmp_path / "f.pdf")
    a, b = make_sweep(tmp_path / "x" / "same"), make_sweep(tmp_path / "y" / "same")
    with pytest.raises(GuidedError, match="need as many different labels, got same, same"):
        tradeoff([a, b], tmp_path / "f.png")
