"""Checks of user inputs in transformers' chat format and of `generate`'s images, before any model work.

A conversation is a list of messages `{"role": ..., "content": str | [items]}`; an item is
`{"type": "text", "text": str}`, `{"type": "image", "image": PIL image | array | path or URL}`
(`"url"` or `"path"` instead of `"image"` also work, as in transformers) or, for a family that takes video,
`{"type": "video", "video": frames}`: a list of PIL images (or [H, W, C] arrays) of one size, an array / tensor
[T, H, W, C], or a video file's path (decoded by the adapter, models/video.py)."""
from __future__ import annotations

import copy
import os

from dstp.errors import InputError

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")


def check_conversations(conversations, placeholder: str | None, video_family: str | None = None) -> list[list[dict]]:
    """A deep copy of `conversations` (a list of conversations) once every message is well formed.
    `placeholder` is the processor's image token string: a text holding it would disagree with the images.
    `video_family`: None when the model takes video, else its family's name (a video item is then refused)."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise InputError("conversations must be a non-empty list of conversations (each a list of messages)")
    if isinstance(conversations[0], dict):
        raise InputError("conversations must be a list of conversations: wrap a single conversation as [messages]")
    for c, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise InputError(f"conversation {c} must be a non-empty list of messages")
        for m, message in enumerate(conv):
            check_message(message, f"conversation {c}, message {m}", placeholder, video_family)
        if not any(message["role"] == "user" for message in conv):
            raise InputError(f"conversation {c} has no user message")
    return copy.deepcopy([list(conv) for conv in conversations])  # apply_chat_template edits content in place


def check_message(message, where: str, placeholder: str | None, video_family: str | None = None):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise InputError(f"{where} must be a dict with 'role' and 'content'")
    if message["role"] not in ROLES:
        raise InputError(f"{where}: unknown role {message['role']!r}; known: {', '.join(ROLES)}")
    content = message["content"]
    items = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{where}: content must be a string or a list of items")
    for i, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise InputError(f"{where}, item {i}: a text item needs a string 'text'")
            if placeholder and placeholder in text:
                raise InputError(f"{where}, item {i}: the text holds the image placeholder {placeholder!r}; give "
                                 f"each image as an item {{'type': 'image', 'image': ...}} instead")
        elif kind == "image":
            if not any(item.get(key) is not None for key in IMAGE_KEYS):
                raise InputError(f"{where}, item {i}: an image item needs the image under 'image' (or 'url'/'path')")
        elif kind == "video":
            if video_family is not None:
                raise InputError(f"{where}, item {i}: dstp's {video_family} adapter takes no video input (video "
                                 f"families: Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision)")
            if any(key in item for key in ("video_start", "video_end")):
                raise InputError(f"{where}, item {i}: video_start / video_end (a time range of the clip) are not "
                                 f"supported: pass the clip's frames or a trimmed file")
            check_video(next((item[k] for k in VIDEO_KEYS if item.get(k) is not None), None), f"{where}, item {i}")
        else:
            raise InputError(f"{where}, item {i}: unknown item type {kind!r}; known: text, image, video")


def check_video(video, where: str):
    """A video item's content: a path, or frames that exist and share one size (channels last)."""
    if video is None:
        raise InputError(f"{where}: a video item needs the video under 'video' (or 'url'/'path')")
    if isinstance(video, (str, os.PathLike)):
        return
    if isinstance(video, (list, tuple)):
        if not video:
            raise InputError(f"{where}: the video has zero frames")
        sizes = [frame_size(f, f"{where}, frame {t}") for t, f in enumerate(video)]
        if len(set(sizes)) > 1:
            t = next(t for t, s in enumerate(sizes) if s != sizes[0])
            raise InputError(f"{where}: the video's frames differ in size: frame 0 is {sizes[0][0]}x{sizes[0][1]} "
                             f"(width x height), frame {t} is {sizes[t][0]}x{sizes[t][1]}")
        return
    shape = tuple(getattr(video, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"{where}: a video must be a list of frames, an array [T, H, W, C] or a file path; got "
                         f"{type(video).__name__} of shape {shape}")
    if shape[0] == 0:
        raise InputError(f"{where}: the video has zero frames")


def frame_size(frame, where: str) -> tuple[int, int]:
    """(width, height) of one frame: a PIL image or an array [H, W, C]."""
    if hasattr(frame, "size") and not hasattr(frame, "shape"):
        return tuple(frame.size)
    shape = tuple(getattr(frame, "shape", ()))
    if len(shape) != 3:
        raise InputError(f"{where}: a frame must be a PIL image or an array [H, W, C], got {type(frame).__name__}")
    return shape[1], shape[0]


def check_image_lists(images, prompts, placeholder: str | None) -> tuple[list[list], list[str]]:
    """`generate`'s inputs as (a list of images per prompt, prompts): `images[i]` is one image, a list of
    images, or None (text only); each prompt must hold one placeholder per image."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError("no prompts given: pass a list of prompt strings")
    if not isinstance(images, (list, tuple)):
        raise InputError(f"images must be a list with one entry per prompt (an image, a list of images, or None "
                         f"for a text-only prompt); got {type(images).__name__}")
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images but {len(prompts)} prompts: pass one entry of images per prompt")
    per_prompt = []
    for i, (entry, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt {i} is empty")
        entry = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if any(im is None for im in entry):
            raise InputError(f"images[{i}] holds None among its images")
        if placeholder:
            found = prompt.count(placeholder)
            if found != len(entry):
                raise InputError(f"prompt {i} holds {found} image placeholder(s) {placeholder!r} but {len(entry)} "
                                 f"image(s) were given for it")
        per_prompt.append(entry)
    return per_prompt, list(prompts)
