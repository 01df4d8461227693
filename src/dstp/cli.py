"""`dstp` command line: bench, generate, analyze, speed, fidelity, shiftbench train."""
from __future__ import annotations

import argparse
import sys

from dstp.errors import DSTPError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dstp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    b = sub.add_parser("bench", help="ShiftBench sweep: methods x {vanilla, +DSTP} x retention x tasks")
    b.add_argument("--model", default=None, help="model dir or hub id (default: the shipped ShiftBench model)")
    b.add_argument("--methods", type=_csv, default=None, help="comma list of pruners; 'none' = unpruned only")
    b.add_argument("--tasks", type=_csv, default=None, help="comma list of lookup,pair,walk")
    b.add_argument("--retentions", type=_floats, default=None, help="e.g. 0.666,0.333,0.111")
    b.add_argument("--seed", type=int, default=1234, help="seed of the fresh evaluation samples")
    b.add_argument("--n", type=int, default=None, help="samples per task")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--out", default=None, help="output folder for bench.json and plots (default results/; "
                                                  "results/quick/ with --quick; + ablation/ with --ablation)")
    b.add_argument("--prune-layer", type=int, default=None,
                   help="K of FastV/SparseVLM (default: 2 of 32 layers' depth fraction, K=1 on ShiftBench); "
                        "an error when --methods has neither")
    b.add_argument("--quick", action="store_true",
                   help="a one-minute version: --n 24 --methods fastv,divprune --retentions 0.333 (flags given "
                        "override these), written to results/quick/")
    b.add_argument("--ablation", action="store_true", help="DSTP variants and tau/window sweeps on walk at 33.3%%")

    g = sub.add_parser("generate", help="answer a question about images (or a text-only prompt)")
    g.add_argument("--model", default=None, help="hub id or local directory (default: the shipped ShiftBench model)")
    g.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    g.add_argument("--prompt", required=True, help="the question; rendered by the model's chat template (images first) "
                                                   "unless it already holds the image placeholder or --raw is given")
    g.add_argument("--raw", action="store_true", help="pass --prompt as written, in the model's own format with its "
                                                      "image placeholders, even if the model has a chat template")
    g.add_argument("--prune", default=None, help="pruner name (default: none)")
    g.add_argument("--retention", type=float, default=None, help="fraction of visual tokens kept (needs --prune)")
    g.add_argument("--layer", type=int, default=None, help="prune layer K (needs --prune; default: the method's)")
    g.add_argument("--dstp", action="store_true", help="add DSTP on top of the pruner")
    g.add_argument("--tau", type=float, default=None, help="DSTP shift threshold (needs --dstp; default 0.75)")
    g.add_argument("--window", type=int, default=None, help="DSTP revival window (needs --dstp; default 20)")
    g.add_argument("--source", default=None, help="DSTP revived K/V: recompute or store (needs --dstp)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--trace", action="store_true", help="print the per-step trace, one line a step")
    g.add_argument("--trace-json", default=None, help="write the full per-step trace as JSON to this file")

    a = sub.add_parser("analyze", help="RVIS analysis of one image + prompt: shift curve and heatmaps")
    a.add_argument("--model", default=None)
    a.add_argument("--image", default=None, help="image file (default: a ShiftBench walk sample)")
    a.add_argument("--prompt", default=None)
    a.add_argument("--seed", type=int, default=None, help="seed of the ShiftBench sample (default 7; only without --image)")
    a.add_argument("--steps", type=_ints, default=None,
                   help="decoding steps to draw heatmaps for (default: all of an answer of up to 8 steps, else "
                        "the prompt, the first 3 RVIS events and the last step)")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--layer", type=int, default=None, help="layer to analyse (default: the most focused one)")
    a.add_argument("--out", default="results/analyze")

    s = sub.add_parser("speed", help="time and peak memory: generate() (dynamic, static cache) vs the engine unpruned, "
                                     "FastV and FastV + DSTP, in a kv-bound and a weight-bound scenario, or on a "
                                     "model built from a published config.json (real)")
    s.add_argument("--scenario", choices=["kv-bound", "weight-bound", "both", "real"], default=None,
                   help="default: both (kv-bound and weight-bound); real with --model-config")
    s.add_argument("--model-config", default=None, metavar="PATH",
                   help="the real scenario: a published config.json (or its folder) of Qwen3-VL, Qwen2.5-VL or "
                        "LLaVA-1.5; its model at full depth and width with random weights, batch 1, one image")
    s.add_argument("--image", default=None, metavar="WxH",
                   help="real: the image size the family's processor is given (default 1280x960)")
    s.add_argument("--layers", type=int, default=None, help="real: this many LLM layers instead of the config's")
    s.add_argument("--out", default="results", help="folder for speed.json (and --profile tables)")
    s.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: kv-bound 5, weight-bound "
                                                             "1, real 1)")
    s.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default: kv-bound 32, "
                                                                "weight-bound 1024, real 128)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--small", action="store_true", help="small shapes of both scenarios, for a quick look")
    s.add_argument("--sync-debug", action="store_true", help="count host synchronisations per decoding step "
                                                             "(CUDA: with torch.cuda.set_sync_debug_mode)")
    s.add_argument("--profile", action="store_true", help="a torch.profiler table of one run of each DSTP row")
    s.add_argument("--no-compile", action="store_true", help="hf_generate_static without the torch.compile that "
                                                             "transformers applies to it on CUDA")

    f = sub.add_parser("fidelity", help="engine vs transformers generate() on tiny models of every family")
    f.add_argument("--new-tokens", type=int, default=32)
    f.add_argument("--out", default=None, help="write the rows as JSON here")
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"], help="comma list of float32,bfloat16")

    sb = sub.add_parser("shiftbench", help="ShiftBench model tools")
    sbs = sb.add_subparsers(dest="shiftbench_command", required=True, parser_class=OneLineParser)
    sbs.add_parser("train", help="train the ShiftBench model (all remaining args go to the trainer)",
                   add_help=False)
    ss = sbs.add_parser("sample", help="write ShiftBench images (PNG) and their prompts to try dstp generate on")
    ss.add_argument("--out", required=True, help="output folder")
    ss.add_argument("--task", default="walk", choices=("lookup", "pair", "walk"))
    ss.add_argument("--n", type=int, default=3, help="how many samples")
    ss.add_argument("--seed", type=int, default=0)
    ss.add_argument("--hops", type=int, default=None, help="walk length (--task walk only; default: 2..6 at random)")
    se = sbs.add_parser("export", help="write ShiftBench samples + lmms-eval task YAMLs (the samples dstp bench "
                                       "evaluates with the same --seed/--n)")
    se.add_argument("--out", required=True, help="output folder (lmms-eval --include_path)")
    se.add_argument("--seed", type=int, default=1234, help="seed of the samples, as dstp bench --seed")
    se.add_argument("--n", type=int, default=500, help="samples per task, as dstp bench --n")
    se.add_argument("--tasks", type=_csv, default=None, help="comma list of lookup,pair,walk (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["shiftbench", "train"]:
        from dstp.lab.shiftbench.train import main as train_main

        return train_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        return _dispatch(args)
    except (DSTPError, FileNotFoundError) as e:
        print(f"dstp {args.command}: error: {e}", file=sys.stderr)
        return 2


def _quiet_transformers():
    """The CLI reports its own progress; transformers' loading bars and config notes are noise there."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _dispatch(args) -> int:
    if args.command == "fidelity":
        from dstp.lab.bench.fidelity import run_fidelity

        rows = run_fidelity(new_tokens=args.new_tokens, out_path=args.out, device=args.device,
                            dtypes=tuple(args.dtypes))
        return 0 if all(r["tokens_identical"] and r["max_abs_logit_diff"] < 1e-5 for r in rows) else 1
    if args.command == "generate":
        from dstp.generate_cli import run_generate

        return run_generate(args)
    if args.command == "bench":
        from dstp.lab.bench.sweep import run_bench_cli

        return run_bench_cli(args)
    if args.command == "analyze":
        from dstp.rvis import run_analyze_cli

        return run_analyze_cli(args)
    if args.command == "speed":
        from dstp.lab.bench.speed import run_speed_cli

        return run_speed_cli(args)
    if args.command == "shiftbench" and args.shiftbench_command == "sample":
        from dstp.lab.shiftbench.sample import run_sample_cli

        return run_sample_cli(args)
    if args.command == "shiftbench" and args.shiftbench_command == "export":
        from dstp.lab.shiftbench.export import run_export_cli

        return run_export_cli(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
