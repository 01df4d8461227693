"""The ShiftBench model: a per-cell patch embedder in front of an HF Llama decoder.

Visual token i = MLP(pixels of cell i) + CELL[i], where CELL is a learned per-cell coordinate table
(a position embedding: the content comes only from the pixels). A text token that names a cell
(``r3c7``) gets CELL[cell] added to its word embedding, rolled by ``cell_query_roll`` dimensions
(so a query head can read the name's copy while its key head reads the visual token's copy, and
the name token does not match its own key). That is all the input-embedding logic, and it lives in :meth:`embed_multimodal`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class ShiftBenchConfig(PretrainedConfig):
    model_type = "dstp_shiftbench"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(
        self,
        text_config=None,
        grid_size: int = 12,
        cell_pixels: int = 8,
        image_token_id: int = 3,
        cell_token_offset: int = 30,
        vision_hidden_size: int = 256,
        init_std: float = 0.08,
        cell_query_roll: int = 0,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        elif text_config is None:
            text_config = LlamaConfig()
        self.text_config = text_config
        self.grid_size = grid_size
        self.cell_pixels = cell_pixels
        self.image_token_id = image_token_id
        self.cell_token_offset = cell_token_offset
        self.vision_hidden_size = vision_hidden_size
        self.init_std = init_std
        self.cell_query_roll = cell_query_roll
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size


class ShiftBenchVision(nn.Module):
    """pixels [B, 3, G*P, G*P] -> one embedding per cell [B, G*G, D], row-major."""

    def __init__(self, config: ShiftBenchConfig):
        super().__init__()
        p, d = config.cell_pixels, config.text_config.hidden_size
        self.grid_size, self.cell_pixels = config.grid_size, p
        self.patch = nn.Sequential(nn.Linear(3 * p * p, config.vision_hidden_size), nn.GELU(), nn.Linear(config.vision_hidden_size, d))
        self.cell_pos = nn.Embedding(config.num_image_tokens, d)

    def cells(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, G*P, G*P] -> [B, G*G, 3*P*P], cell (r, c) at index r * G + c."""
        b, g, p = pixel_values.shape[0], self.grid_size, self.cell_pixels
        x = pixel_values.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, 3 * p * p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patch(self.cells(pixel_values)) + self.cell_pos.weight


class ShiftBenchForConditionalGeneration(PreTrainedModel):
    config_class = ShiftBenchConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: ShiftBenchConfig):
        super().__init__(config)
        config.text_config._attn_implementation = config._attn_implementation or "sdpa"
        self.vision = ShiftBenchVision(config)
        self.language_model = LlamaModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif hasattr(module, "weight") and module.__class__.__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def embed_multimodal(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None):
        """(inputs_embeds [B, T, D], visual_mask [B, T]): word embeddings, plus CELL[cell] on tokens
        that name a cell, with the visual tokens scattered in order at the image-token positions."""
        cfg = self.config
        embeds = self.language_model.embed_tokens(input_ids)
        cell = input_ids - cfg.cell_token_offset
        is_cell = (cell >= 0) & (cell < cfg.num_image_tokens)
        cell_keys = self.vision.cell_pos(cell.clamp(0, cfg.num_image_tokens - 1))
        if cfg.cell_query_roll:  # the name carries the coordinate in other dims than the key
            cell_keys = torch.roll(cell_keys, cfg.cell_query_roll, dims=-1)
        embeds = embeds + cell_keys * is_cell.unsqueeze(-1).to(embeds.dtype)
        visual_mask = input_ids == cfg.image_token_id
        if visual_mask.any():
            if pixel_values is None:
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            counts = visual_mask.sum(-1)
            if not bool((counts[counts > 0] == cfg.num_image_tokens).all()):
                raise ValueError(f"each image needs exactly {cfg.num_image_tokens} image tokens, got {counts.tolist()}")
            rows = counts > 0
            visual = self.vision(pixel_values.to(embeds.dtype))[rows[: pixel_values.shape[0]]]
            embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1).expand_as(embeds), visual)
        return embeds, visual_mask

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        embeds, _ = self.embed_multimodal(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, attentions=out.attentions
        )


def register() -> None:
    """Make AutoConfig / AutoModelForImageTextToText know the ShiftBench model (idempotent)."""
    try:
        AutoConfig.register(ShiftBenchConfig.model_type, ShiftBenchConfig)
    except ValueError:
        pass
    try:
        AutoModelForImageTextToText.register(ShiftBenchConfig, ShiftBenchForConditionalGeneration)
    except ValueError:
        pass


register()
