"""Checks of user inputs in transformers' chat format and of `generate`'s images, before any model work.

A conversation is a list of messages `{"role": ..., "content": str | [items]}`; an item is
`{"type": "text", "text": str}` or `{"type": "image", "image": PIL image | array | path or URL}`
(`"url"` or `"path"` instead of `"image"` also work, as in transformers)."""
from __future__ import annotations

import copy

from dstp.errors import InputError

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("image", "url", "path", "base64")


def check_conversations(conversations, placeholder: str | None) -> list[list[dict]]:
    """A deep copy of `conversations` (a list of conversations) once every message is well formed.
    `placeholder` is the processor's image token string: a text holding it would disagree with the images."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise InputError("conversations must be a non-empty list of conversations (each a list of messages)")
    if isinstance(conversations[0], dict):
        raise InputError("conversations must be a list of conversations: wrap a single conversation as [messages]")
    for c, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise InputError(f"conversation {c} must be a non-empty list of messages")
        for m, message in enumerate(conv):
            check_message(message, f"conversation {c}, message {m}", placeholder)
        if not any(message["role"] == "user" for message in conv):
            raise InputError(f"conversation {c} has no user message")
    return copy.deepcopy([list(conv) for conv in conversations])  # apply_chat_template edits content in place


def check_message(message, where: str, placeholder: str | None):
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
            raise InputError(f"{where}, item {i}: video inputs are not supported yet")
        else:
            raise InputError(f"{where}, item {i}: unknown item type {kind!r}; known: text, image")


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
