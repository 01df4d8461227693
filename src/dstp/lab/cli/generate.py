"""`dstp generate`: images + a question through a (pruned, DSTP) pipeline. The question is rendered by the model's
chat template when it has one; a prompt that already holds the model's image placeholder (ShiftBench's
`<image> lookup r3c4 =`), or `--raw`, is passed as written."""
from __future__ import annotations

import json

import dstp
from dstp.config import DSTPConfig, PruneConfig, VisionPulseConfig
from dstp.errors import ConfigError, InputError
from dstp.lab.cli.common import default_model, open_image
from dstp.lab.shiftbench.inputs import relevant_mask
from dstp.policy import check_policy
from dstp.pruners import check_method


def add_parser(sub) -> None:
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
    g.add_argument("--policy", default=None, help="decode-time policy: dstp (as --dstp) or visionpulse (no --prune)")
    g.add_argument("--visionpulse-setting", default=None, help="VisionPulse's authors' setting: 10pct (default), 5pct")
    g.add_argument("--anchor-layer", type=int, default=None,
                   help="VisionPulse anchor layer (default: 17 of 36, depth-scaled)")
    g.add_argument("--fixed-budget", type=float, default=None, help="VisionPulse constant budget in (0, 1]")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--trace", action="store_true", help="print the per-step trace, one line a step")
    g.add_argument("--trace-json", default=None, help="write the full per-step trace as JSON to this file")
    g.set_defaults(run=run)


def configs(args) -> tuple[PruneConfig | None, DSTPConfig | VisionPulseConfig | None]:
    """PruneConfig / the decode-time policy's config from the flags; a flag without the option it belongs to is an
    error."""
    vp = {"anchor_layer": args.anchor_layer, "fixed_budget": args.fixed_budget}
    if args.policy is not None:
        check_policy(args.policy)
        if args.dstp and args.policy != "dstp":
            raise ConfigError(f"--dstp and --policy {args.policy} disagree: pick one")
        args.dstp = args.policy == "dstp"
    if args.policy == "visionpulse":
        if args.prune is not None:
            raise ConfigError("VisionPulse's rule has no prefill pruner: drop --prune")
        for flag, value in (("--tau", args.tau), ("--window", args.window), ("--source", args.source)):
            if value is not None:
                raise ConfigError(f"{flag} is a DSTP setting, not VisionPulse's")
        setting = args.visionpulse_setting or "10pct"
        return None, VisionPulseConfig.setting(setting, **{k: v for k, v in vp.items() if v is not None})
    for flag, value in (("--visionpulse-setting", args.visionpulse_setting), ("--anchor-layer", args.anchor_layer),
                        ("--fixed-budget", args.fixed_budget)):
        if value is not None:
            raise ConfigError(f"{flag} needs --policy visionpulse")
    if args.prune is None:
        for flag, value in (("--retention", args.retention), ("--layer", args.layer)):
            if value is not None:
                raise ConfigError(f"{flag} needs --prune METHOD")
        if args.dstp:
            raise ConfigError("--dstp needs a base pruner: add --prune METHOD --retention R")
    if not args.dstp:
        for flag, value in (("--tau", args.tau), ("--window", args.window), ("--source", args.source)):
            if value is not None:
                raise ConfigError(f"{flag} needs --dstp")
    if args.prune is None:
        return None, None
    check_method(args.prune)
    if args.retention is None:
        raise ConfigError("--prune needs --retention R (the fraction of visual tokens kept, e.g. 0.333)")
    prune = PruneConfig(method=args.prune, retention=args.retention, layer=args.layer)
    if not args.dstp:
        return prune, None
    given = {"tau": args.tau, "window": args.window, "source": args.source}
    return prune, DSTPConfig(**{k: v for k, v in given.items() if v is not None})


def oracle_relevant(pipe, images, prompt: str):
    """`--prune oracle`: the visual tokens the answer needs, which only a ShiftBench question names."""
    if pipe.adapter.family != "shiftbench":
        raise ConfigError("--prune oracle needs the cells the answer needs; only ShiftBench prompts say so")
    if len(images) != 1:
        raise InputError("a ShiftBench prompt takes exactly one --image")
    return relevant_mask(images, [prompt])


def trace_lines(row: dict, fed: list[str]) -> list[str]:
    """The per-step trace, one line a step: the token fed in, DSTP's similarity, shift, active set, revivals."""
    lines = [f"visual tokens {row['n_visual']}, kept {len(row['kept'])} from layer {row['prune_layer']}"]
    for step in row["steps"]:
        line = f"step {step['step']:>3}  fed {fed[step['step']]!r:<12}  visual {step['visual_attended']:>5}"
        if "similarity" in step:
            revived = step["revived"]
            more = f" (+{len(revived) - 8})" if len(revived) > 8 else ""
            line += (f"  sim {step['similarity']:.2f}{'  SHIFT' if step['shift'] else '       '}"
                     f"  active {step['active']:>5}")
            if revived:
                line += "  revived " + " ".join(map(str, revived[:8])) + more
        lines.append(line)
    return lines


def run(args) -> int:
    prune, shift = configs(args)
    images = [open_image(p) for p in args.image]
    pipe = dstp.load(args.model or default_model(), prune=prune, shift=shift, dtype=args.dtype, device=args.device)
    relevant = oracle_relevant(pipe, images, args.prompt) if args.prune == "oracle" else None
    placeholder = pipe.adapter.image_placeholder
    written = args.raw or (placeholder is not None and placeholder in args.prompt)  # already in the model's format
    chat = not written and getattr(pipe.processor, "chat_template", None) is not None
    if chat and relevant is not None:
        raise ConfigError("--prune oracle needs the prompt as written (<image> lookup r3c4 =), not a chat message")
    if chat:
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": args.prompt}]
        result = pipe.chat([[{"role": "user", "content": content}]], max_new_tokens=args.max_new_tokens)
    else:
        result = pipe.generate([images], [args.prompt], max_new_tokens=args.max_new_tokens, relevant=relevant)
    print(result.texts[0])
    row = result.trace.row(0)
    if args.trace:
        tokens = result.tokens[0, : result.trace.new_tokens[0]].tolist()
        tok = getattr(pipe.processor, "tokenizer", pipe.processor)
        fed = [tok.decode([t]) for t in tokens]  # step t feeds the token generated before it
        print("\n".join(trace_lines(row, fed)))
    if args.trace_json:
        with open(args.trace_json, "w") as f:
            json.dump(row, f, indent=1)
    return 0
