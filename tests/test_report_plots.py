"""The report's plots keep every label inside the figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from elmforest.study.report import plot_compute_curves  # noqa: E402


def test_compute_plot_labels_fit_inside_the_figure(tmp_path, monkeypatch):
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to measure it
    curves = {"dense": [(1e13, 300.0), (4e13, 80.0)], "btm_forest": [(2e13, 140.0), (4e13, 70.0)]}
    plot_compute_curves(curves, tmp_path / "ppl_vs_compute.png")
    assert (tmp_path / "ppl_vs_compute.png").stat().st_size > 0
    (fig,) = kept
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    ax = fig.axes[0]
    for label in (ax.yaxis.label, ax.xaxis.label):
        ext = label.get_window_extent(renderer)
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1, label.get_text()
    plt.close(fig)
