"""dstp: decoding-stage shift-aware visual token pruning for HF multimodal LLMs."""
