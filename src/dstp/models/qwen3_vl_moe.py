"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL (same ViT with DeepStack, same interleaved M-RoPE
and q/k norm) with a mixture-of-experts LLM: a layer's MLP is a top-k router over experts whose weights are 3-D
tensors. The layer runs as transformers writes it (router and experts included, one call per decoder layer), so
every attribute path and input is Qwen3-VL's; only the FLOP count differs: a token pays for its top-k experts."""
from __future__ import annotations

from dstp.models.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    model_type = "qwen3_vl_moe"
    example_id = "Qwen/Qwen3-VL-30B-A3B-Instruct"

    def linear_params_per_layer(self) -> int:
        """Weights one token touches in an average layer: attention projections and router, dense MLPs, and
        `num_experts_per_tok / num_experts` of each sparse layer's expert weights."""
        cfg = self.text_config
        share = cfg.num_experts_per_tok / cfg.num_experts
        total = 0.0
        for layer in self.layers:
            for name, p in layer.named_parameters():
                if ".experts." in f".{name}":
                    total += p.numel() * share
                elif p.dim() == 2:
                    total += p.numel()
        return round(total / len(self.layers))
