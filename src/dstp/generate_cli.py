"""`dstp generate`: images + a question through a (pruned, DSTP) pipeline. The question is rendered by the model's
chat template when it has one; a prompt that already holds the model's image placeholder (ShiftBench's
`<image> lookup r3c4 =`), or `--raw`, is passed as written."""
from __future__ import annotations

import json
import os

from PIL import Image, UnidentifiedImageError

from dstp.config import DSTPConfig, PruneConfig
from dstp.errors import ConfigError, InputError


def open_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise InputError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def default_model() -> str:
    from dstp.lab.shiftbench import default_checkpoint_dir

    return str(default_checkpoint_dir())


def configs(args) -> tuple[PruneConfig | None, DSTPConfig | None]:
    """PruneConfig / DSTPConfig from the flags; a flag without the option it belongs to is an error."""
    from dstp.pruners import check_method

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
    from dstp.lab.shiftbench.inputs import relevant_mask

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


def run_generate(args) -> int:
    import dstp

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
