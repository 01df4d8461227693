"""Bench plots: one line per method and shift, equal series kept apart, zero bars still visible."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dstp.lab.bench.plots import _bars, _pruned_groups, _styles, plot_all  # noqa: E402


def _records():
    out = [dict(task="walk", method="none", shift="none", retention=1.0, accuracy=1.0, prefill_flops=1e9,
                decode_flops=4e8, correct=[True] * 4, events=[1, 1, 2, 2])]
    for method in ("fastv", "divprune"):
        for shift in ("none", "dstp"):
            for ret in (0.333, 0.666):
                acc = 0.0 if method == "divprune" and shift == "none" else ret  # equal values for fastv both ways
                out.append(dict(task="walk", method=method, shift=shift, retention=ret, accuracy=acc,
                                prefill_flops=ret * 1e9, decode_flops=2e8 * (shift == "dstp"),
                                correct=[acc > 0, False, acc > 0, False], events=[1, 1, 2, 2]))
    return out


def test_each_method_gets_a_vanilla_then_a_dstp_series_over_retentions():
    groups = _pruned_groups(_records(), "walk")
    assert list(groups) == [("divprune", "none"), ("divprune", "dstp"), ("fastv", "none"), ("fastv", "dstp")]
    assert all([r["retention"] for r in rs] == [0.333, 0.666] for rs in groups.values())


def test_a_bar_at_zero_is_still_drawn_and_labelled():
    records = [r for r in _records() if r["shift"] == "none" and r["retention"] in (0.333, 1.0)]
    fig, ax = plt.subplots()
    _bars(ax, np.array(records[0]["events"]), records, _styles({r["method"] for r in records}))
    zero = [p for p in ax.patches if p.get_height() == 0]
    assert zero and all(p.get_linewidth() > 0 for p in zero)  # the outline shows on the axis
    assert [t.get_text() for t in ax.texts] == ["0", "0"]  # divprune in both event bins
    plt.close(fig)


def test_plot_all_writes_the_three_pngs(tmp_path):
    paths = plot_all(_records(), str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy_vs_retention.png", "accuracy_vs_gflops.png",
                                                    "success_by_rvis_events.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)
