"""`dstp speed` (lab/cli/speed.py): do the savings show up as time and memory? Two synthetic scenarios in one command
(DESIGN §8), and a real model's shapes on request:

- `kv-bound`: many visual tokens (2,304), small layers (8 x 512), batch 4, 32 new tokens: the visual K/V dominate
  what a decoding step reads, as when serving at a large batch.
- `weight-bound`: batch 1, layers wide for their K/V (8 x 1,024, GQA 8 query / 2 KV heads of 128 as in Qwen2.5-VL,
  MLP 2,816, a 32k vocabulary: 123M weights read per step), 1,024 visual tokens, 1,024 new tokens: the weights
  dominate what a step reads (0.49 GB against 34 MB of K/V at the last step), as for a 4-8B model at batch 1,
  whose real size would not fit a few minutes on a 2-core CPU.
- `real` (`--model-config PATH`): a random-weight model built from a published config.json (Qwen3-VL, Qwen2.5-VL,
  LLaVA-1.5) at full depth and width, batch 1, one image (default 1280x960) with the inputs its family's processor
  would give (`real_speed_config`, `build_real_batch`), 128 new tokens: what `scripts/gpu_check.sh` runs on a GPU
  with Qwen3-VL-4B's config.

Rows: transformers' generate() with its dynamic cache (`hf_generate`) and its static cache (`hf_generate_static`),
the engine unpruned, FastV at 33.3% from layer 2, and FastV + DSTP with each source. DSTP rows are forced to shift
every `shift_every` steps (kv-bound 8, weight-bound and real 32, window 20) with DSTP's `random` target: on random
weights CPTS's top-k rarely leaves S0 (S0's softmax over k keys out-scores the reserve's over N - k), so random targets
make each shift revive about (1 - retention) * k tokens, and the cost of producing their K/V is really paid.

Per row: decoding throughput `tokens_per_s` (batch x decoding steps / decoding seconds), `prefill_s` (vision tower
and embedding included), `peak_bytes_measured` (memory.py: allocations over the whole call) next to
`peak_bytes_reported` (the engine: every buffer its state holds, `Engine.held_bytes`; generate(): its KV cache),
and the measured time over an ideal, both relative to the unpruned engine: decode proportional to the bytes a step
reads (`decode_bytes`: the weights once per step, the K/V it attends, DSTP's moves of revived K/V and, for
`recompute`, the weights of layers >= P once per shift), prefill proportional to FLOPs.

Modules: `config` (the scenarios' shapes), `models` (the synthetic scenarios' model and inputs), `real` (the real
scenario's), `baselines` (transformers' generate() rows), `runner` (the engine rows, every row of a scenario,
`run_speed`), `ideal` (the byte-proportional ideal of a decoding run), `memory` (peak memory measured from
allocations), `syncs` (host synchronisations per decoding step), `profiling` (a torch.profiler table of one run),
`report` (the targets and the tables).
"""
