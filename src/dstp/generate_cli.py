"""`dstp generate`: one image + prompt through a (pruned, DSTP) pipeline."""
from __future__ import annotations

import json
import os

from PIL import Image, UnidentifiedImageError

from dstp.config import DSTPConfig, PruneConfig
from dstp.errors import InputError


def open_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise InputError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def default_model() -> str:
    from dstp.shiftbench import default_checkpoint_dir

    return str(default_checkpoint_dir())


def run_generate(args) -> int:
    import dstp

    from dstp.pruners import check_method

    if args.prune:
        check_method(args.prune)
    prune = PruneConfig(method=args.prune, retention=args.retention, layer=args.layer) if args.prune else None
    if args.prune is None and args.retention != 1.0:
        raise InputError("--retention needs --prune METHOD")
    shift = DSTPConfig(tau=args.tau, window=args.window, source=args.source) if args.dstp else None
    image = open_image(args.image)
    pipe = dstp.load(args.model or default_model(), prune=prune, shift=shift)
    result = pipe.generate([image], [args.prompt], max_new_tokens=args.max_new_tokens)
    print(result.texts[0])
    if args.trace:
        print(json.dumps(result.trace.row(0), indent=1))
    return 0
