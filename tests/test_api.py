"""`dstp.load` from a local directory (the real from_pretrained path) and its input errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlamaConfig, LlavaProcessor, PreTrainedTokenizerFast

import dstp
from dstp import ConfigError, DSTPConfig, InputError, PruneConfig, UnsupportedModelError
from dstp.lab.bench import tiny_models as tm


def tiny_llava_processor():
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(96)])}
    vocab["<image>"] = tm.IMAGE_TOKEN
    for i in range(len(vocab), tm.VOCAB):
        vocab[f"x{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=6, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    model = tm.tiny_llava()
    model.save_pretrained(path)
    tiny_llava_processor().save_pretrained(path)
    return str(path)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_load_local_dir_and_generate_batch(llava_dir):
    pipe = dstp.load(llava_dir, prune=PruneConfig("fastv", 0.333), shift=DSTPConfig())
    prompts = ["<image> w3 w4", "w1 <image> w7 w8 w9 w10"]
    out = pipe.generate(images(2), prompts, max_new_tokens=5)
    assert len(out.texts) == 2 and out.tokens.shape[0] == 2
    assert out.trace.n_visual == [25, 25]
    assert [len(k) for k in out.trace.kept] == [9, 9]  # ceil(0.333 * 25)
    # the same generation through transformers' generate() when nothing is pruned
    plain = dstp.load(llava_dir)
    batch = plain.processor(images=images(2), text=prompts, return_tensors="pt", padding=True, padding_side="left")
    hf = plain.adapter.model.generate(**batch, max_new_tokens=5, do_sample=False)
    ours = plain.generate(images(2), prompts, max_new_tokens=5)
    assert torch.equal(ours.tokens, hf[:, batch["input_ids"].shape[1]:])


def test_bad_inputs_name_the_problem(llava_dir, tmp_path):
    pipe = dstp.load(llava_dir)
    with pytest.raises(InputError, match="2 images but 1 prompts"):
        pipe.generate(images(2), ["<image> w1"])
    with pytest.raises(InputError, match="prompt 0 is empty"):
        pipe.generate(images(1), ["  "])
    batch = pipe.processor(images=images(1), text=["<image> w1"], return_tensors="pt")
    batch["input_ids"] = batch["input_ids"][:, 3:]  # drop a few image placeholders
    batch["attention_mask"] = batch["attention_mask"][:, 3:]
    with pytest.raises(InputError, match="image-token count mismatch"):
        pipe.adapter.prepare(batch)
    with pytest.raises(InputError, match="checkpoint not found"):
        dstp.load(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="retention must be in"):
        PruneConfig("fastv", retention=0.0)
    with pytest.raises(ConfigError, match="outside the model"):
        dstp.load(llava_dir, prune=PruneConfig("fastv", 0.5, layer=9))
    with pytest.raises(ConfigError, match="DSTP needs a base pruner"):
        dstp.load(llava_dir, shift=DSTPConfig())


def test_unsupported_architecture_lists_supported(tmp_path):
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="supported: .*LlavaForConditionalGeneration"):
        dstp.load(str(tmp_path))
