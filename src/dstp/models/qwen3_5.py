"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`): Qwen3-VL's vision tower
(no DeepStack) and a hybrid LLM whose layers are Gated DeltaNet linear attention except every fourth, full
attention (`text_config.layer_types`). Positions and rope deltas as Qwen3-VL (interleaved M-RoPE).

Linear-attention layers hold no per-token K/V: each row carries a convolution window and a recurrent state. The
engine runs transformers' own decoder layer for them with that state in its own store
(`engine/recurrent_state.py`, called through `hf_compat.call_linear_decoder_layer`), so prefill and decoding are
transformers' computation. Full-attention layers project q twice as wide (the second half gates the output) and
rotate a quarter of head_dim: `query`/`key` (pruners' attention rows) follow that.

What pruning and DSTP mean on this LLM is decided in docs/hybrid.md; `check_methods` refuses the rest before any
model work."""
from __future__ import annotations

import torch

from dstp.errors import ConfigError
from dstp.models import hf_compat
from dstp.models.base import check_image_tokens
from dstp.models.qwen2_5_vl import Qwen25VLAdapter

LINEAR = "linear_attention"


class Qwen35Adapter(Qwen25VLAdapter):
    family = "qwen3_5"
    architectures = ("Qwen3_5ForConditionalGeneration",)
    model_type = "qwen3_5"
    example_id = "Qwen/Qwen3.5-2B"
    config_fields = ("vision_config", "text_config", "image_token_id")
    takes_video = True  # its video features come from the image path of the vision tower, as Qwen3-VL's

    # -- what a hybrid LLM can run (docs/hybrid.md) --------------------------------------------------------------
    @classmethod
    def check_methods(cls, config, pruner=None, policy_config=None):
        """A one-line ConfigError for a method this family cannot run, before any model work. `config`: the model's
        config; `pruner`: the built pruner (its prune points); `policy_config`: the DSTP config, if any."""
        text = config.get_text_config()
        types = list(text.layer_types)
        name = cls.family
        full = [i for i, t in enumerate(types) if t != LINEAR]
        if policy_config is not None and not hasattr(policy_config, "source"):  # VisionPulse (docs/hybrid.md)
            raise ConfigError(f"VisionPulse is not supported on {name}: its step reads a subset of every later "
                              f"layer's visual K/V, and its linear-attention layers keep a recurrent state instead "
                              f"(docs/hybrid.md)")
        if policy_config is not None and policy_config.source != "store":
            raise ConfigError(f"DSTP (source {policy_config.source!r}) is not supported on {name}: a revived token "
                              f"cannot enter its linear-attention layers' recurrent state without rerunning every "
                              f"token after it (docs/hybrid.md)")
        if pruner is None:
            return
        points = tuple(getattr(pruner, "stage_layers", None) or (pruner.layer,))
        if policy_config is not None:
            # the probe layer as ShiftPolicy.probe_layer chooses it: the configured one, else the layer before P
            probe = policy_config.probe_layer if policy_config.probe_layer is not None else max(points[0] - 1, 0)
            if types[probe] == LINEAR:
                raise ConfigError(f"DSTP with {pruner.name} at layer {points[0]} is not supported on {name}: it "
                                  f"probes the attention of layer {probe}, which is linear attention (full "
                                  f"attention: layers {full}; docs/hybrid.md)")
        if points == (0,):
            return  # before the LLM: the model runs on the shorter sequence, as on any family
        needs = pruner_attention_layers(pruner, points)
        bad = [i for i in needs if types[i] == LINEAR]
        if needs and bad:
            raise ConfigError(f"{pruner.name} at layer(s) {list(points)} is not supported on {name}: it ranks "
                              f"tokens by the attention of layer(s) {bad}, which are linear attention (full "
                              f"attention: layers {full}; docs/hybrid.md)")

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Layers whose token mixer is linear attention: the engine keeps no K/V for them."""
        return tuple(i for i, t in enumerate(self.text_config.layer_types) if t == LINEAR)

    def is_linear(self, layer_idx: int) -> bool:
        return self.text_config.layer_types[layer_idx] == LINEAR

    # -- inputs ---------------------------------------------------------------------------------------------------
    def visual_inputs(self, pixel_values, grid, visual, embeds, internals: bool = True, video: bool = False):
        # transformers' get_video_features is its get_image_features on the video's pixels and grid (no DeepStack)
        call = self.vision_call(pixel_values, grid, video)
        out, vision = self.with_internals(call, grid) if internals else (call(), None)
        feats = hf_compat.pooled_features(out)
        check_image_tokens(visual.long(), 1, feats.shape[0])
        return feats, vision, {}

    # -- layers ---------------------------------------------------------------------------------------------------
    def run_layer(self, layer_idx: int, hidden, attention, cos, sin, cache):
        if self.is_linear(layer_idx):
            step = cache.linear_step(layer_idx, hidden.shape[1])
            return hf_compat.call_linear_decoder_layer(self.layers[layer_idx], hidden, (cos, sin), step)
        return super().run_layer(layer_idx, hidden, attention, cos, sin, cache)

    def _attn(self, layer_idx: int):
        if self.is_linear(layer_idx):
            raise ConfigError(f"layer {layer_idx} of {self.family} is linear attention: it has no attention rows")
        return super()._attn(layer_idx)

    def query(self, layer_idx: int, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        """Rotated queries: the first half of each head's q_proj output (the second half gates the output)."""
        attn = self._attn(layer_idx)
        x = self.layers[layer_idx].input_layernorm(hidden)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, 2 * self.head_dim)[..., :self.head_dim]
        return hf_compat.rotate(attn.q_norm(q).transpose(1, 2), cos, sin)

    def linear_params_per_layer(self) -> int:
        """Mean over the layers: linear-attention and full-attention layers have different projections."""
        return sum(p.numel() for layer in self.layers for p in layer.parameters() if p.dim() == 2) // self.n_layers


class Qwen35MoeAdapter(Qwen35Adapter):
    family = "qwen3_5_moe"
    architectures = ("Qwen3_5MoeForConditionalGeneration",)
    model_type = "qwen3_5_moe"
    example_id = "Qwen/Qwen3.5-35B-A3B"


def pruner_attention_layers(pruner, points) -> list[int]:
    """The layers whose attention a pruner inside the LLM ranks by (empty: it reads none). FastV and SparseVLM read
    the layer before each prune point (`ctx.attention`), PyramidDrop the prune point's own layer."""
    if "attention" not in getattr(pruner, "needs", ()):
        return []
    own = getattr(pruner, "own_attention", False)
    return [p if own else p - 1 for p in points]
