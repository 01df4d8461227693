"""What every `dstp` command shares: a parser that reports a bad flag in one line with exit status 2, the
comma-list argument types, the run-and-report pattern (a DSTPError is one line on stderr and exit status 2, never a
traceback), and the inputs more than one subcommand reads (an image file, the default model)."""
from __future__ import annotations

import argparse
import os
import sys

from PIL import Image, UnidentifiedImageError
from transformers.utils import logging

from dstp.errors import DSTPError, InputError
from dstp.lab.shiftbench import default_checkpoint_dir


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def run_command(prog: str, command, args) -> int:
    """`command(args)`'s exit status; a DSTPError (or a missing file) is one line on stderr and exit status 2."""
    try:
        return command(args)
    except (DSTPError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def quiet_transformers() -> None:
    """The CLI reports its own progress; transformers' loading bars and config notes are noise there."""
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def open_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise InputError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def default_model() -> str:
    """The shipped ShiftBench model: what `--model` means when it is left out."""
    return str(default_checkpoint_dir())
