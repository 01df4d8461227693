"""`dstp analyze`: the RVIS analysis (`dstp.rvis`) of one image + prompt (default: a ShiftBench walk): shift curve,
events, heatmaps (`dstp.lab.bench.rvis_plots`), and where DSTP on FastV shifts on the same input. With `--video`
(a clip file, for a model that takes video) the heatmap is frame by step: the attention on each frame at each step."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

import dstp
from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.errors import InputError
from dstp.lab.bench.rvis_plots import counted, plot_curve, plot_frame_heatmap, plot_heatmaps
from dstp.lab.cli.common import default_model, int_list, open_image
from dstp.lab.shiftbench import generate_samples
from dstp.rvis import (EVENT_PROMINENCE, EVENT_THRESHOLD, RVISReport, frame_relevance, most_focused_layer, relevance,
                       report)

DEFAULT_SAMPLE_SEED = 7
DSTP_COMPARISON = ("fastv", 0.333)  # the pruner DSTP runs on in `dstp analyze`
ALL_STEPS_UP_TO = 8  # answers this short get a heatmap for every step



def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="RVIS analysis of one image + prompt: shift curve and heatmaps")
    a.add_argument("--model", default=None)
    a.add_argument("--image", default=None, help="image file (default: a ShiftBench walk sample)")
    a.add_argument("--video", default=None, help="video file instead of an image (Qwen2.5-VL, Qwen3-VL, "
                   "LLaVA-OneVision): a frame-by-step heatmap of where the model reads")
    a.add_argument("--prompt", default=None)
    a.add_argument("--seed", type=int, default=None, help="seed of the ShiftBench sample (default 7; only without --image)")
    a.add_argument("--steps", type=int_list, default=None,
                   help="decoding steps to draw heatmaps for (default: all of an answer of up to 8 steps, else "
                        "the prompt, the first 3 RVIS events and the last step)")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--layer", type=int, default=None, help="layer to analyse (default: the most focused one)")
    a.add_argument("--out", default="results/analyze")
    a.set_defaults(run=run)


def check_analyze_flags(args) -> None:
    """What the flags alone can tell, before a model is loaded."""
    if args.image is not None and args.video is not None:
        raise InputError("pass either --image or --video, not both")
    if args.video is not None and args.prompt is None:
        raise InputError("--video needs --prompt (the question about that clip)")
    if args.image is not None and args.prompt is None:
        raise InputError("--image needs --prompt (the question about that image)")
    if args.image is None and args.video is None and args.prompt is not None:
        raise InputError("--prompt needs --image or --video (without them, analyze uses a ShiftBench walk and its "
                         "own prompt)")
    if args.video is not None and not os.path.isfile(args.video):
        raise InputError(f"--video {args.video}: no such file")
    if (args.image is not None or args.video is not None) and args.seed is not None:
        raise InputError("--seed picks the ShiftBench sample, so it has no effect with --image")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for s in args.steps or []:
        if not 0 <= s < args.max_new_tokens:
            raise InputError(f"--steps {s} is outside 0..{args.max_new_tokens - 1} (a step per new token, "
                             f"--max-new-tokens {args.max_new_tokens})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder")


def check_against_model(args, pipe) -> None:
    """The flags that depend on the loaded model, before it runs."""
    layers = pipe.adapter.n_layers
    if args.layer is not None and not 0 <= args.layer < layers:
        raise InputError(f"--layer {args.layer} is outside the model's {layers} layers (0..{layers - 1})")
    if args.video is not None and not pipe.adapter.takes_video:
        raise InputError(f"--video: dstp's {pipe.adapter.family} adapter takes no video input (video families: "
                         f"Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision)")
    if args.image is None and args.video is None and pipe.adapter.family != "shiftbench":
        raise InputError(f"without --image, analyze runs a ShiftBench sample, which a {pipe.adapter.family} model "
                         "cannot read: pass --image FILE --prompt TEXT")
    limit = context_limit(pipe.adapter)
    if limit is not None and args.max_new_tokens >= limit:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {limit} tokens")


def context_limit(adapter) -> int | None:
    """The language model's position limit (max_position_embeddings), if its config states one."""
    return getattr(adapter.language_model.config, "max_position_embeddings", None)


def analysis_input(args):
    """(image as an array, prompt): the given ones, or a 4-hop ShiftBench walk."""
    if args.image is None:
        seed = DEFAULT_SAMPLE_SEED if args.seed is None else args.seed
        sample = generate_samples("walk", 1, seed=seed, hops=4)[0]
        return sample.image, sample.prompt
    return np.asarray(open_image(args.image)), args.prompt


def heatmap_steps(args, rep: RVISReport, n_steps: int) -> list[int]:
    """The steps to draw: --steps, or every step of a short answer, else the prompt, the first three events and the
    last step."""
    if args.steps is None:
        return list(range(n_steps)) if n_steps <= ALL_STEPS_UP_TO else sorted({0, *rep.events[:3], n_steps - 1})
    beyond = [s for s in args.steps if s >= n_steps]
    if beyond:
        print(f"dstp analyze: warning: the answer has {n_steps} steps (0..{n_steps - 1}); no heatmap for --steps "
              + ",".join(map(str, beyond)), file=sys.stderr)
    return [s for s in args.steps if s < n_steps]


def dstp_shift_steps(pipe, prepared, max_new_tokens: int) -> tuple[list[int], str]:
    """Where DSTP on FastV at 33.3% declares a shift on the same input (as decoding steps), and its answer."""
    method, retention = DSTP_COMPARISON
    dpipe = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, retention),
                            shift=DSTPConfig())
    res = dpipe.generate_prepared(prepared, GenerationConfig(max_new_tokens=max_new_tokens))
    return [s["step"] + 1 for s in res.trace.row(0)["steps"] if s.get("shift")], res.texts[0]


def run(args) -> int:
    check_analyze_flags(args)
    pipe = dstp.load(args.model or default_model())
    check_against_model(args, pipe)
    if args.video is not None:
        return run_video(args, pipe)
    image, prompt = analysis_input(args)
    prepared = pipe.prepare([Image.fromarray(np.asarray(image))], [prompt])
    out = pipe.engine.generate(prepared, GenerationConfig(max_new_tokens=args.max_new_tokens))
    n = out.trace.new_tokens[0]
    tokens = out.tokens[:, :n]
    rel = relevance(pipe.engine, prepared, tokens)[0]  # [L, S, N]
    nv = int(prepared.n_visual[0])
    tok = pipe.processor.tokenizer
    fed = ["<prompt>"] + [tok.decode([t]) for t in tokens[0, :-1].tolist()]
    reports = [report(rel[i], i, nv) for i in range(rel.shape[0])]
    layer = args.layer if args.layer is not None else most_focused_layer(rel[:, :, :nv])
    rep = reports[layer]
    shifts, dstp_answer = dstp_shift_steps(pipe, prepared, args.max_new_tokens)
    os.makedirs(args.out, exist_ok=True)
    plot_curve(rep, os.path.join(args.out, "shift_curve.png"), shifts=shifts, labels=fed)
    steps = heatmap_steps(args, rep, rel.shape[1])
    plot_heatmaps(np.asarray(image), rel[layer, :, :nv], steps, os.path.join(args.out, "heatmaps.png"),
                  titles=[f"step {s}: fed {fed[s]!r}" + (" (event)" if s in rep.events else "") for s in steps],
                  suptitle=f"relevance at layer {layer} (one colour scale for all steps)")
    result = {"prompt": prompt, "answer": pipe.decode(tokens, [n])[0], "layer": layer,
              "event_rule": {"threshold": EVENT_THRESHOLD, "prominence": EVENT_PROMINENCE},
              "reports": [r.to_dict() for r in reports], "dstp_shift_steps": shifts,
              "dstp_answer": dstp_answer, "fed_tokens": fed}
    with open(os.path.join(args.out, "rvis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"answer: {result['answer']}")
    print(f"layer {layer}: {counted(rep.events, 'RVIS event')} at steps {rep.events}; DSTP shifted at {shifts}")
    print(f"wrote {args.out}/shift_curve.png, heatmaps.png, rvis.json")
    return 0


def run_video(args, pipe) -> int:
    """The analysis of a clip: the shift curve over every visual token, and the frame-by-step heatmap."""
    conversation = [{"role": "user", "content": [{"type": "video", "video": args.video},
                                                 {"type": "text", "text": args.prompt}]}]
    prepared = pipe.prepare_chat([conversation])
    out = pipe.engine.generate(prepared, GenerationConfig(max_new_tokens=args.max_new_tokens))
    n = out.trace.new_tokens[0]
    tokens = out.tokens[:, :n]
    rel = relevance(pipe.engine, prepared, tokens)[0]  # [L, S, N]
    nv = int(prepared.n_visual[0])
    fed = ["<prompt>"] + [pipe.processor.tokenizer.decode([t]) for t in tokens[0, :-1].tolist()]
    reports = [report(rel[i], i, nv) for i in range(rel.shape[0])]
    layer = args.layer if args.layer is not None else most_focused_layer(rel[:, :, :nv])
    rep = reports[layer]
    frames = frame_relevance(rel[layer, :, :nv], prepared.video.frame[0, :nv])  # [S, F]
    shifts, dstp_answer = dstp_shift_steps(pipe, prepared, args.max_new_tokens)
    os.makedirs(args.out, exist_ok=True)
    plot_curve(rep, os.path.join(args.out, "shift_curve.png"), shifts=shifts, labels=fed)
    plot_frame_heatmap(frames, os.path.join(args.out, "frames.png"), labels=fed, layer=layer, events=rep.events)
    result = {"prompt": args.prompt, "video": args.video, "answer": pipe.decode(tokens, [n])[0], "layer": layer,
              "event_rule": {"threshold": EVENT_THRESHOLD, "prominence": EVENT_PROMINENCE},
              "reports": [r.to_dict() for r in reports], "frame_relevance": frames.tolist(),
              "read_frame": frames.argmax(-1).tolist(), "dstp_shift_steps": shifts, "dstp_answer": dstp_answer,
              "fed_tokens": fed}
    with open(os.path.join(args.out, "rvis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"answer: {result['answer']}")
    print(f"layer {layer}: {counted(rep.events, 'RVIS event')} at steps {rep.events}; most-read frame per step "
          f"{result['read_frame']}; DSTP shifted at {shifts}")
    print(f"wrote {args.out}/shift_curve.png, frames.png, rvis.json")
    return 0
