"""Real-width checkpoints of the models users run, built offline into the test session's hub cache.

For each checkpoint in CHECKPOINTS the repo is written under its REAL hub id (e.g. "Qwen/Qwen3-VL-4B-Instruct"),
so `dstp.load("Qwen/Qwen3-VL-4B-Instruct")` with HF_HUB_OFFLINE=1 finds it as it would find the real download:
`<hub_cache>/models--Qwen--Qwen3-VL-4B-Instruct/snapshots/<hash>/` + `refs/main` (tests/hub_fixtures.py's layout).
The snapshot holds:

- the PUBLISHED processor-side files, byte for byte as saved in tests/real_configs/<org>--<name>/
  (preprocessor_config.json, video_preprocessor_config.json, processor_config.json, chat_template.json /
  chat_template.jinja where the checkpoint publishes them; tests/real_configs/SOURCES.md says where each came from),
  and the published generation_config.json;
- config.json: the published one with ONLY the number of LLM layers and vision layers reduced (widths, heads,
  vocabulary, rope settings, special token ids, DeepStack / full-attention indexes all as published; a per-layer
  `layer_types` list cut to the layers kept); DEPTHS below;
- model.safetensors: random weights at that full width, bf16 (see `_fill`);
- a tokenizer trained here (tokenizers library, family style: byte-level BPE for Qwen, SentencePiece-like BPE with
  byte fallback for LLaVA) on hub_fixtures' small corpus, padded with filler tokens so that EVERY special / added
  token of the real tokenizer sits at its real id (read from the published tokenizer_config.json's
  added_tokens_decoder, or for LLaVA-NeXT the ids its processor reports), with the published chat template.

Depths (why): LLM 4 layers everywhere: enough for every pruner's prune point (FastV K=1, PyramidDrop's three
stages at 1/2/3 need 4 layers) and for Qwen3-VL's DeepStack, which feeds LLM layers 0, 1, 2. Vision:
- Qwen3-VL-4B: 6 of 24 blocks with DeepStack REMAPPED from [5, 11, 17] to [1, 3, 4] (round(i * 6 / 24)): 18 blocks
  at 4,800 patches cost about a minute a pass on this 2-core CPU, too slow for `make test`; the published indexes
  run unchanged in Qwen3-VL-8B below;
- Qwen3-VL-8B (`real_slow` only): 25 of 27 blocks, so that DeepStack [8, 16, 24] exists unchanged;
- Qwen2.5-VL-7B: 8 of 32 blocks: windowed blocks 0-6 and block 7, the first of the full-attention blocks
  [7, 15, 23, 31]; so the last block attends globally, as in the released model (the others lie past the depth);
- LLaVA-1.5 / LLaVA-NeXT: 3 of 24 CLIP layers; vision_feature_layer -2 (as published) reads layer 1's output and
  the last layer is computed but unused, as in the real model;
- InternVL3.5-8B: 4 of 24 InternViT layers (vision_feature_layer -1 reads the last; no config index points into
  the tower), and text_config.layer_types (one entry a layer, all full_attention) cut to the 4 LLM layers. Its 13
  tiles (3,328 visual tokens) make the unmarked test about 100 s here, like Qwen2.5-VL-7B's.
Qwen3-VL-4B's DeepStack is the one remapped index.

Weights (`_fill`): matrices N(0, (GAIN / sqrt(fan_in))^2) with GAIN 1.5, embeddings N(0, 1) (tied to the head:
N(0, 0.02^2); a tied head still answers one repeated token, see HF-FIXTURES.md), biases N(0, 0.02),
norm weights 1 + N(0, 0.02); the LM-head rows of every token but the trained vocabulary and the eos tokens are zero
(a tied head - Qwen3-VL-4B - zeroes those input embeddings too), so answers are made of the trained pieces and
can end. HF-FIXTURES.md's std 0.2 is for width 64; at full width the fan-in scaling keeps bf16 activations sane
and answers non-degenerate (checked by tests/test_real_checkpoints.py).

Build: deterministic (per-checkpoint seed), skipped when refs/main names a complete snapshot for the current
content of this file and of tests/real_configs/<folder>/ (not the transformers version: both 5.x environments
share one cache and the safetensors load in either). `build(hub_cache, repo_id)` builds one; `build_all`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import time
import uuid
from dataclasses import dataclass

import hub_fixtures as H

HERE = pathlib.Path(__file__).resolve().parent
REAL_CONFIGS = HERE / "real_configs"

LLM_LAYERS = 4
GAIN = 1.5


@dataclass(frozen=True)
class Spec:
    folder: str  # tests/real_configs/<folder>
    family: str  # dstp adapter family
    vision_layers: int
    seed: int
    slow: bool  # only in the `real_slow` set
    deepstack: tuple[int, ...] | None = None  # remapped DeepStack indexes (None: the published ones)


CHECKPOINTS: dict[str, Spec] = {
    "Qwen/Qwen3-VL-4B-Instruct": Spec("Qwen--Qwen3-VL-4B-Instruct", "qwen3_vl", 6, 31, slow=False, deepstack=(1, 3, 4)),
    "Qwen/Qwen3-VL-8B-Instruct": Spec("Qwen--Qwen3-VL-8B-Instruct", "qwen3_vl", 25, 32, slow=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": Spec("Qwen--Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8, 33, slow=False),
    "llava-hf/llava-1.5-7b-hf": Spec("llava-hf--llava-1.5-7b-hf", "llava", 3, 34, slow=False),
    "llava-hf/llava-v1.6-mistral-7b-hf": Spec("llava-hf--llava-v1.6-mistral-7b-hf", "llava_next", 3, 35, slow=False),
    "OpenGVLab/InternVL3_5-8B-HF": Spec("OpenGVLab--InternVL3_5-8B-HF", "internvl", 4, 36, slow=False),
}

# processor-side files copied verbatim when the checkpoint publishes them
VERBATIM = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
            "chat_template.json", "chat_template.jinja", "generation_config.json")

# LLaVA-NeXT's published tokenizer files were not found; its processor reports these added tokens (SOURCES.md)
LLAVA_NEXT_ADDED = {32000: ("<image>", True), 32001: ("<pad>", True)}
LLAMA_BASE = {0: "<unk>", 1: "<s>", 2: "</s>"}


def published(repo_id: str, name: str) -> pathlib.Path:
    return REAL_CONFIGS / CHECKPOINTS[repo_id].folder / name


def published_json(repo_id: str, name: str) -> dict:
    return json.loads(published(repo_id, name).read_text())


def chat_template(repo_id: str) -> str:
    folder = REAL_CONFIGS / CHECKPOINTS[repo_id].folder
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return json.loads((folder / "chat_template.json").read_text())["chat_template"]


# ----------------------------------------------------------------------------------------------------------
# config.json: the published one, fewer layers
# ----------------------------------------------------------------------------------------------------------

def reduced_config(repo_id: str) -> dict:
    """The published config.json with only the LLM and vision layer counts reduced."""
    spec = CHECKPOINTS[repo_id]
    cfg = published_json(repo_id, "config.json")
    text = cfg["text_config"] if "text_config" in cfg else cfg  # Qwen2.5-VL keeps its LLM fields at the top level
    text["num_hidden_layers"] = LLM_LAYERS
    if "max_window_layers" in text:
        text["max_window_layers"] = min(text["max_window_layers"], LLM_LAYERS)
    if "layer_types" in text:  # one entry a layer (InternVL3.5's Qwen3 text_config): the first LLM_LAYERS
        text["layer_types"] = text["layer_types"][:LLM_LAYERS]
    vision = cfg["vision_config"]
    key = "depth" if "depth" in vision else "num_hidden_layers"
    vision[key] = spec.vision_layers
    if spec.deepstack is not None:
        vision["deepstack_visual_indexes"] = list(spec.deepstack)
    for name in ("deepstack_visual_indexes",):
        assert all(i < spec.vision_layers for i in vision.get(name, [])), (repo_id, name)
    if "fullatt_block_indexes" in vision:
        assert vision["fullatt_block_indexes"][0] < spec.vision_layers, repo_id
    return cfg


# ----------------------------------------------------------------------------------------------------------
# tokenizers: trained here, every added token at its real id
# ----------------------------------------------------------------------------------------------------------

def added_tokens(repo_id: str) -> dict[int, tuple[str, bool]]:
    """Real id -> (content, special) of every added token of the checkpoint's tokenizer."""
    spec = CHECKPOINTS[repo_id]
    if spec.family == "llava_next":
        return dict(LLAVA_NEXT_ADDED)
    decoder = published_json(repo_id, "tokenizer_config.json")["added_tokens_decoder"]
    return {int(i): (t["content"], bool(t["special"])) for i, t in decoder.items()}


def _filler(prefix: str, start: int, stop: int) -> dict[str, int]:
    return {f"{prefix}{i}": i for i in range(start, stop)}


def _qwen_tokenizer(repo_id: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    added = added_tokens(repo_id)
    first = min(added)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 180, initial_alphabet=alphabet, special_tokens=[],
                                  show_progress=False)
    tok.train_from_iterator(H._corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    n_trained = len(vocab)
    vocab.update(_filler("ĠFILLER", n_trained, first))  # never produced by a merge: unreachable ids
    cfg = published_json(repo_id, "tokenizer_config.json")
    # eos / pad are named only after every added token has its id (given to the constructor, they would take the
    # first free ids out of order)
    t = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None,
                       errors="replace", model_max_length=cfg["model_max_length"], clean_up_tokenization_spaces=False,
                       split_special_tokens=False)
    ids = sorted(added)
    assert ids == list(range(first, first + len(ids))), "added tokens must be contiguous"
    for i in ids:
        content, special = added[i]
        t.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    t.add_special_tokens({"eos_token": cfg["eos_token"], "pad_token": cfg["pad_token"]})
    if isinstance(cfg.get("extra_special_tokens"), dict):
        # InternVL: the named image tokens its processor reads (<img>, </img>, <IMG_CONTEXT>, <video>), set once
        # every added token has its id (given to the constructor, they too would take the first free ids)
        t._set_model_specific_special_tokens(cfg["extra_special_tokens"])
    t.chat_template = cfg.get("chat_template") or chat_template(repo_id)
    return t, n_trained


def _llama_tokenizer(repo_id: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer

    added = added_tokens(repo_id)
    added = {i: v for i, v in added.items() if i not in LLAMA_BASE}
    first = min(added)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[], show_progress=False)
    tok.train_from_iterator(H._corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {s: i for i, s in LLAMA_BASE.items()}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    n_trained = len(vocab)
    vocab.update(_filler("\u2581FILLER", n_trained, first))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    t = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False,
                       model_max_length=1000000000000000019884624838656, pad_token=None,
                       clean_up_tokenization_spaces=False)
    for i in sorted(added):
        content, special = added[i]
        if content == "<pad>":
            t.add_special_tokens({"pad_token": AddedToken(content, special=True, normalized=False)})
        else:
            t.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    t.chat_template = chat_template(repo_id)
    return t, n_trained


def tokenizer(repo_id: str):
    """(tokenizer, number of trained ids): ids [0, n_trained) are the trained vocabulary."""
    if CHECKPOINTS[repo_id].family in ("llava", "llava_next"):
        return _llama_tokenizer(repo_id)
    return _qwen_tokenizer(repo_id)


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------

NORM_NAMES = ("norm", "ln_", "layrnorm")  # RMSNorm / LayerNorm weights (CLIP spells one "pre_layrnorm")


def _fill(model, seed: int, keep_rows: list[int]) -> None:
    """Random bf16 weights in place (see the module docstring); LM-head rows outside `keep_rows` zeroed. The model
    was built without weight init, so every parameter is written here."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            mean = 0.0
            if p is embed:
                # untied: N(0, 1). Tied (Qwen3-VL-4B): small, so that the input embeddings stay below the layers'
                # outputs (answers still repeat one token with random weights: HF-FIXTURES.md's tied-head note)
                std = 0.02 if p is head else 1.0
            elif p is head:
                std = 1.0 / math.sqrt(p.shape[1])
            elif p.dim() >= 2:
                std = GAIN / math.sqrt(p[0].numel())
            elif name.endswith("bias"):
                std = 0.02
            elif any(k in leaf for k in NORM_NAMES):
                mean, std = 1.0, 0.02
            elif "lambda" in leaf:  # InternViT layer scale
                mean, std = 0.1, 0.01
            else:  # CLS / image-newline vectors
                std = 1.0
            flat = p.view(p.shape[0], -1) if p.dim() else p.view(1, 1)
            step = max(1, (1 << 24) // flat.shape[1])  # ~16M values at a time
            for r in range(0, flat.shape[0], step):
                chunk = flat[r:r + step]
                chunk.copy_((torch.randn(chunk.shape, generator=g) * std + mean).to(p.dtype))
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        keep[keep_rows] = True
        head[~keep] = 0.0


def _model(repo_id: str, snapshot: pathlib.Path, n_trained: int):
    """The model class of the reduced config, bf16, built without transformers' weight init (its buffers - rotary
    inv_freq, position ids - are computed by __init__ as usual), then filled by `_fill`."""
    import torch
    import transformers as tf
    from transformers.initialization import no_init_weights

    config = tf.AutoConfig.from_pretrained(snapshot)
    config._attn_implementation = "sdpa"
    cls = getattr(tf, config.architectures[0])
    with no_init_weights():
        model = cls._from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # a tied head (Qwen3-VL-4B) is one tensor, as in the real checkpoint
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    wants = getattr(config.get_text_config(), "tie_word_embeddings", None)  # 5.25: not on every text config
    wants = bool(getattr(config, "tie_word_embeddings", False) if wants is None else wants)
    if tied and not wants:
        # InternVL3.5-HF: config.json leaves the top-level tie_word_embeddings at InternVLConfig's default (True), which
        # transformers 5 ties by, while text_config (Qwen3) says False; the published safetensors hold their own
        # lm_head.weight (the transformers 4.55 conversion tied by text_config and saved both), and from_pretrained
        # then keeps the two apart ("both are present in the checkpoints with different values, so we will NOT tie
        # them"). The stand-in ships its own head too, so it loads untied like the real one.
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
        getattr(model, "all_tied_weights_keys", {}).clear()
        tied = False
    assert tied == wants, tied
    gen = published_json(repo_id, "generation_config.json")
    eos = gen.get("eos_token_id", config.get_text_config().eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos)
    _fill(model, CHECKPOINTS[repo_id].seed, list(range(n_trained)) + eos)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# the hub cache
# ----------------------------------------------------------------------------------------------------------

def _digest(repo_id: str) -> str:
    h = hashlib.sha1(pathlib.Path(__file__).read_bytes())
    h.update(repo_id.encode())
    folder = REAL_CONFIGS / CHECKPOINTS[repo_id].folder
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "BUILD.json")


def snapshot_dir(hub_cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    folder = H._repo_folder(hub_cache, repo_id)
    return folder / "snapshots" / _digest(repo_id)


def is_complete(hub_cache: pathlib.Path, repo_id: str) -> bool:
    folder = H._repo_folder(hub_cache, repo_id)
    ref = folder / "refs" / "main"
    snap = snapshot_dir(hub_cache, repo_id)
    return ref.is_file() and ref.read_text().strip() == snap.name and all((snap / f).is_file() for f in REQUIRED)


def _write(directory: pathlib.Path, repo_id: str) -> dict:
    """Every file of the snapshot into `directory`; returns the build record (BUILD.json)."""
    import torch
    from transformers.utils import logging as tf_logging

    t0 = time.perf_counter()
    src = REAL_CONFIGS / CHECKPOINTS[repo_id].folder
    for name in VERBATIM:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)
    (directory / "config.json").write_text(json.dumps(reduced_config(repo_id), indent=2) + "\n")
    tok, n_trained = tokenizer(repo_id)
    tok.save_pretrained(directory)
    # transformers 5 writes the tokenizer's template to chat_template.jinja, which the processor would read before
    # the published chat_template.json: keep it in tokenizer_config.json instead, as the real checkpoints do
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    for name in VERBATIM:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)
    model = _model(repo_id, directory, n_trained)
    bar = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, max_shard_size="100GB")
    finally:
        if bar:
            tf_logging.enable_progress_bar()
    # save_pretrained rewrote these: the snapshot keeps the published (reduced) config and generation config
    (directory / "config.json").write_text(json.dumps(reduced_config(repo_id), indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", directory / "generation_config.json")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    record = {"repo_id": repo_id, "seconds": round(time.perf_counter() - t0, 1), "bytes": size,
              "trained_vocab": n_trained, "llm_layers": LLM_LAYERS, "vision_layers": CHECKPOINTS[repo_id].vision_layers}
    (directory / "README.md").write_text(
        f"# {repo_id} (dstp test stand-in)\n\nNOT the real model: the published configuration files of {repo_id} "
        f"with {LLM_LAYERS} LLM layers and {CHECKPOINTS[repo_id].vision_layers} vision layers, random weights, a "
        "tokenizer trained on a few sentences. Built by dstp's tests/real_checkpoints.py for tests only.\n")
    (directory / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build(hub_cache: pathlib.Path, repo_id: str) -> dict:
    """Build `repo_id` into hub_cache unless a complete snapshot for the current sources exists; returns its
    BUILD.json record (build seconds and bytes of the build that wrote it)."""
    hub_cache = pathlib.Path(hub_cache)
    folder = H._repo_folder(hub_cache, repo_id)
    final = snapshot_dir(hub_cache, repo_id)
    if not is_complete(hub_cache, repo_id):
        snapshots = folder / "snapshots"
        snapshots.mkdir(parents=True, exist_ok=True)
        if not all((final / f).is_file() for f in REQUIRED):
            tmp = folder / f".tmp-{final.name[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                _write(tmp, repo_id)
                if not all((final / f).is_file() for f in REQUIRED):
                    if final.exists():
                        shutil.rmtree(final, ignore_errors=True)
                    try:
                        os.rename(tmp, final)
                    except OSError:
                        if not all((final / f).is_file() for f in REQUIRED):
                            raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for old in snapshots.iterdir():  # earlier versions: several GB each
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
        (folder / "refs").mkdir(exist_ok=True)
        ref_tmp = folder / "refs" / f".main-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ref_tmp.write_text(final.name)
        os.replace(ref_tmp, folder / "refs" / "main")
    return json.loads((final / "BUILD.json").read_text())


def remove(hub_cache: pathlib.Path, repo_id: str) -> None:
    """Delete `repo_id`'s stand-in from hub_cache (every snapshot, ref and blob of it)."""
    shutil.rmtree(H._repo_folder(pathlib.Path(hub_cache), repo_id), ignore_errors=True)


def build_all(hub_cache: pathlib.Path) -> dict[str, dict]:
    return {repo_id: build(hub_cache, repo_id) for repo_id in CHECKPOINTS}


def photo(seed: int = 0, size=(1280, 960)):
    """A deterministic photo-sized image (hub_fixtures.sample_images' colour cells + noise)."""
    return H.sample_images(1, seed=seed, sizes=[size])[0]
