"""RVIS relevance against transformers' own eager attention weights, and the event rule."""
import copy

import numpy as np
import torch

from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.lab.bench.rvis_plots import heatmap_figure
from dstp.rvis import dips, events, relevance, report, shift_curve
from dstp.lab.bench import tiny_models as tm


def test_relevance_matches_eager_output_attentions():
    model = tm.tiny_llava()
    batch = tm.llava_batch([3, 7, 1])
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    prepared = adapter.prepare(batch)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=6))
    rel = relevance(engine, prepared, out.tokens)  # [B, L, 7, N]

    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for sub in (eager.model.language_model,):
        sub.config._attn_implementation = "eager"
    ids = torch.cat([batch["input_ids"], out.tokens[:, :-1]], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.tokens[:, :-1])], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], position_ids=pos,
                    output_attentions=True)
    T = batch["input_ids"].shape[1]
    vis = batch["input_ids"] == tm.IMAGE_TOKEN
    for layer, att in enumerate(ref.attentions):
        for b in range(3):
            expect = att[b, :, T - 1:, :T][:, :, vis[b]].mean(0)  # [steps, N]
            assert (rel[b, layer] - expect).abs().max() < 1e-5


def test_events_are_dips_below_threshold():
    curve = [1.0, 0.9, 0.6, 0.8, 0.65, 0.65, 0.9, 0.5]
    assert events(curve) == [2, 4, 7]  # three dips, each recovering by >= 0.1 (a plateau counts once)
    assert events([1.0, 0.8, 0.75, 0.9]) == []  # a dip whose bottom stays above the threshold is no event
    assert events([1.0]) == []
    assert events([1.0, 0.2, 0.9, 0.1]) == [1, 3]


def test_noise_on_a_low_plateau_is_one_event_at_the_drop():
    # a walk at the reading layer: the attention leaves the prompt's cell at step 1 and never comes back;
    # the wiggles below 0.05 are noise, not new dips
    curve = [1.0, 0.018, 0.017, 0.013, 0.014, 0.043, 0.016]
    assert dips(curve) == [(1, 7)]
    assert events(curve) == [1]
    assert events([1.0, 0.3, 0.35, 0.28, 0.36, 0.3]) == [1]


def test_an_event_sits_at_the_bottom_of_its_dip_and_needs_prominence():
    assert events([1.0, 0.75, 0.6, 0.45, 0.6, 1.0]) == [3]  # not where it starts falling
    assert events([1.0, 0.5, 0.58, 0.3, 1.0]) == [3]  # a rise of 0.08 does not end the dip: one event, at its bottom
    assert events([1.0, 0.5, 0.62, 0.3, 1.0]) == [1, 3]  # a rise of 0.12 does
    assert events([1.0, 0.5, 0.58, 0.3, 1.0], prominence=0.05) == [1, 3]


def test_report_shift_curve_starts_at_one_and_masses_are_shares():
    torch.manual_seed(0)
    r = torch.softmax(torch.randn(5, 16), -1)
    rep = report(r, layer=0, n_valid=16, retention=0.25)
    assert abs(rep.curve[0] - 1.0) < 1e-6
    assert rep.overlap_with_prefill_topk[0] == 1.0
    assert all(0.0 <= m <= 1.0 for m in rep.mass_in_prefill_topk)
    assert np.allclose(shift_curve(r).numpy(), rep.curve, atol=1e-6)


def test_heatmaps_share_one_colour_scale_with_a_colorbar_and_cell_labels():
    r = torch.zeros(3, 144)
    r[0, 5], r[1, 40], r[2, 100] = 0.75, 0.25, 0.0625  # (exact in float32); one panel alone would scale its own peak to full colour
    fig = heatmap_figure(np.zeros((96, 96, 3), np.uint8), r, [0, 1, 2], titles=["a", "b", "c"])
    heat = [im for ax in fig.axes for im in ax.images][1:]  # after the image panel
    assert len(heat) == 3 and {im.get_clim() for im in heat} == {(0.0, 0.75)}
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["image", "a", "b", "c"]
    assert [int(t) for t in panels[1].get_yticks()] == list(range(12))  # every row of a 12 x 12 grid labelled
