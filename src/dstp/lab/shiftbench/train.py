"""Train the ShiftBench model from a seed: ``dstp shiftbench train --seed 0 [--out DIR]`` (lab/cli/train.py).

Recipe (DESIGN §7, choices explained in checkpoint/NOTES.md): 16-layer d=128 Llama decoder, per-cell patch
embedder, one token per cell tied to the cell's coordinate embedding. Heads of layer 2 start as a
name -> cell matched filter (the read), layer 0's q/k as the same filter (the locating signal below FastV's
K=1), layers 0-1 as frozen identities that are released slowly. Init std 0.08, AdamW lr 2e-3 with warm-up
and cosine decay, several questions packed per image (dense supervision), curriculum lookup -> 1 hop ->
6 hops, and in half the rows random unneeded visual tokens hidden from attention.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import LlamaConfig

from dstp.errors import ConfigError
from dstp.lab.shiftbench.card import write_card
from dstp.lab.shiftbench.evaluation import evaluate
from dstp.lab.shiftbench.modeling import ShiftBenchConfig, ShiftBenchForConditionalGeneration
from dstp.lab.shiftbench.processor import ShiftBenchProcessor, images_to_pixels
from dstp.lab.shiftbench.render import render_grid
from dstp.lab.shiftbench.tasks import DEFAULT_WALK_HOPS, make_question, random_grid

FINAL_EVAL_SEED = 20261124  # generate_samples stream; training draws from its own stream
PROBE_EVAL_SEED = 777


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    layers: int = 16
    hidden: int = 128
    heads: int = 4
    grid_size: int = 12
    cell_pixels: int = 8
    steps: int = 1200
    batch: int = 32
    text_tokens: int = 128  # tokens of packed questions after the image
    lr: float = 2e-3
    warmup: int = 100
    init_std: float = 0.08
    lookup_steps: int = 150  # lookups only
    ramp_end: float = 0.3  # fraction of steps by which walks reach max_hops
    max_hops: int = 6
    tie_heads: int = 2  # heads of each reader layer initialised as a cell-name -> cell matched filter
    tie_std: float = 0.2
    read_layer: int = 2  # the first layer whose heads start as the matched filter
    read_every_layer: bool = False  # also every layer above it (tried at 16 layers: never learned the lookup)
    locate_layers: tuple[int, ...] = (0,)  # layers below read_layer whose q/k also start as the filter (output 0)
    freeze_below_steps: int = 300  # layers below read_layer stay identities (frozen) this long,
    below_ramp_steps: int = 300  # then their learning rate ramps up from 0 over this many steps
    threads: int = 2
    cell_init_scale: float = 2.0
    task_mix: tuple[float, float, float] = (0.2, 0.15, 0.65)  # lookup, pair, walk questions after the lookup phase
    # In this share of training rows, up to hide_max of the visual tokens that no question of the row needs
    # are hidden from attention (a uniform random subset, no pruner's choice), so that a missing token the
    # answer does not depend on leaves the answer unchanged, as prefill pruning assumes of simple questions.
    hide_rows: float = 0.5
    hide_max: float = 0.9

    def __post_init__(self):
        def bad(what):
            raise ConfigError(f"TrainConfig: {what}")

        if self.layers < 1 or self.steps < 1 or self.batch < 1:
            bad(f"layers, steps and batch must be >= 1, got {self.layers}, {self.steps}, {self.batch}")
        if not 0 <= self.read_layer < self.layers:
            bad(f"read_layer must be in 0..{self.layers - 1} (the model has {self.layers} layers), got {self.read_layer}")
        if any(not 0 <= i < self.read_layer for i in self.locate_layers):
            bad(f"locate_layers must lie below read_layer {self.read_layer}, got {list(self.locate_layers)}")
        if not 0.0 <= self.hide_rows <= 1.0 or not 0.0 <= self.hide_max < 1.0:
            bad(f"hide_rows must be in [0, 1] and hide_max in [0, 1), got {self.hide_rows}, {self.hide_max}")
        if len(self.task_mix) != 3 or abs(sum(self.task_mix) - 1.0) > 1e-6 or min(self.task_mix) < 0:
            bad(f"task_mix must be 3 non-negative shares of lookup, pair, walk summing to 1, got {self.task_mix}")


def build_model(cfg: TrainConfig, processor: ShiftBenchProcessor) -> ShiftBenchForConditionalGeneration:
    tok = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=512,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = ShiftBenchConfig(
        text_config=text,
        grid_size=cfg.grid_size,
        cell_pixels=cfg.cell_pixels,
        image_token_id=processor.image_token_id,
        cell_token_offset=tok.convert_tokens_to_ids("r0c0"),
        init_std=cfg.init_std,
        cell_query_roll=cfg.hidden // 2,
    )
    torch.manual_seed(cfg.seed)
    model = ShiftBenchForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, cfg.init_std)
        # the content part of a visual token starts at the coordinate table's scale, so that a
        # cell-name query can find its key's coordinate part (5x larger content drowned it)
        probe = images_to_pixels([render_grid(random_grid(np.random.default_rng(0), cfg.grid_size), cfg.cell_pixels)])
        content = model.vision.patch(model.vision.cells(probe))
        model.vision.patch[2].weight.mul_(cfg.init_std / content.pow(2).mean().sqrt())
        # matched filter at init: the coordinate table lives in the first half of the dimensions
        # (the name token's copy is rolled into the second half); heads 0..tie_heads-1 of each reader layer
        # project the name's copy (q) and the visual token's copy (k) with the same matrix
        half = cfg.hidden // 2
        model.vision.cell_pos.weight[:, half:] = 0
        model.vision.cell_pos.weight.mul_(cfg.cell_init_scale)
        # a reader deeper than layer 0 must see the embeddings unchanged at init: the layers below it
        # start as identities (zero output projections), so the matched filter finds the coordinate copies
        for layer in model.language_model.layers[: cfg.read_layer]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        rows = slice(0, cfg.tie_heads * (cfg.hidden // cfg.heads))
        last = cfg.layers if cfg.read_every_layer else cfg.read_layer + 1
        layers = model.language_model.layers
        for layer in [layers[i] for i in cfg.locate_layers] + list(layers[cfg.read_layer:last]):
            shared = torch.randn(rows.stop, half) * cfg.tie_std
            attn = layer.self_attn
            attn.q_proj.weight[rows] = 0
            attn.k_proj.weight[rows] = 0
            attn.q_proj.weight[rows, half:] = shared
            attn.k_proj.weight[rows, :half] = shared
    return model


class Packer:
    """Draws training sequences: BOS, G*G image tokens, then questions + targets + EOS packed."""

    def __init__(self, cfg: TrainConfig, processor: ShiftBenchProcessor):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, 424242])
        self.vocab = processor.tokenizer.get_vocab()
        self.tok = processor.tokenizer

    def ids(self, words):
        return [self.vocab[w] for w in words]

    def segment(self, task, pointers, hops):
        while True:
            q = make_question(task, pointers, self.rng, hops)
            if q is not None:
                return q

    def sequence(self, max_hops: int):
        cfg, rng = self.cfg, self.rng
        pointers = random_grid(rng, cfg.grid_size)
        n_cells = cfg.grid_size**2
        ids = [self.tok.bos_token_id] + [self.vocab["<image>"]] * n_cells
        labels = [-100] * len(ids)
        needed = set()
        while True:
            if max_hops == 0:
                task, hops = "lookup", 0
            else:
                task = rng.choice(["lookup", "pair", "walk"], p=list(cfg.task_mix))
                hops = int(rng.integers(1, max_hops + 1)) if task == "walk" else 0
            question, target, _, cells, *_ = self.segment(task, pointers, hops)
            seg_q, seg_t = self.ids(question), self.ids(target) + [self.tok.eos_token_id]
            if len(ids) + len(seg_q) + len(seg_t) > 1 + n_cells + cfg.text_tokens:
                break
            ids += seg_q + seg_t
            labels += [-100] * len(seg_q) + seg_t
            needed.update(cells)
        pad = 1 + n_cells + cfg.text_tokens - len(ids)
        ids += [self.tok.pad_token_id] * pad
        labels += [-100] * pad
        visible = np.ones(len(ids), dtype=np.int64)
        if rng.random() < cfg.hide_rows:
            spare = np.setdiff1d(np.arange(n_cells), sorted(needed))
            hidden = rng.choice(spare, int(rng.uniform(0, cfg.hide_max) * len(spare)), replace=False)
            visible[1 + hidden] = 0  # the image tokens follow BOS in cell order
        return render_grid(pointers, cfg.cell_pixels), ids, labels, visible

    def batch(self, max_hops: int):
        rows = [self.sequence(max_hops) for _ in range(self.cfg.batch)]
        return (
            images_to_pixels([r[0] for r in rows]),
            torch.tensor([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows]),
            torch.from_numpy(np.stack([r[3] for r in rows])),
        )


def max_hops_at(step: int, cfg: TrainConfig) -> int:
    if step < cfg.lookup_steps:
        return 0
    ramp = max(cfg.ramp_end * cfg.steps - cfg.lookup_steps, 1)
    return min(cfg.max_hops, 1 + int((step - cfg.lookup_steps) / ramp * cfg.max_hops))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def lower_lr_scale(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor of the layers below the reader: 0 while frozen, then a quadratic ramp to 1
    (switching them on at full rate undid the lookup in one trial: token accuracy 0.77 -> 0.17 in 10 steps)."""
    t = (step - cfg.freeze_below_steps) / max(cfg.below_ramp_steps, 1)
    return min(max(t, 0.0), 1.0) ** 2


def final_metrics(model, processor, n: int, seed: int = FINAL_EVAL_SEED) -> dict:
    out = {}
    for task in ("lookup", "pair"):
        out[task] = evaluate(model, processor, task, n, seed)["accuracy"]
    out["walk"] = {h: evaluate(model, processor, "walk", n, seed + h, hops=h)["accuracy"] for h in DEFAULT_WALK_HOPS}
    return out


@dataclass
class Run:
    """Everything one training run updates: built from the seed by :func:`start_run`."""

    cfg: TrainConfig
    processor: ShiftBenchProcessor
    model: ShiftBenchForConditionalGeneration
    packer: Packer
    opt: torch.optim.Optimizer


def start_run(cfg: TrainConfig) -> Run:
    torch.manual_seed(cfg.seed)
    processor = ShiftBenchProcessor.build(cfg.grid_size, cfg.cell_pixels)
    model = build_model(cfg, processor)
    model.train()
    lower = {id(p) for layer in model.language_model.layers[: cfg.read_layer] for p in layer.parameters()}
    groups = []
    for is_lower in (False, True):
        params = [p for p in model.parameters() if (id(p) in lower) == is_lower]
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01, "lower": is_lower},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lower": is_lower}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98))
    return Run(cfg, processor, model, Packer(cfg, processor), opt)


def train_step(run: Run, step: int) -> tuple[float, float, int]:
    """One optimiser step: (loss, token accuracy, max hops of the batch)."""
    cfg, model, opt = run.cfg, run.model, run.opt
    for g in opt.param_groups:
        if g["lower"]:  # AdamW moves a zero weight by ~lr per step: frozen, they stay identities
            for p in g["params"]:
                p.requires_grad_(step >= cfg.freeze_below_steps)
        g["lr"] = lr_at(step, cfg) * (lower_lr_scale(step, cfg) if g["lower"] else 1.0)
    hops = max_hops_at(step, cfg)
    pixels, ids, labels, visible = run.packer.batch(hops)
    # hidden tokens keep every other token's position, as the engine's pruning does
    mask = None if bool(visible.all()) else visible
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        mask = labels[:, 1:] != -100
        acc = (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[mask].float().mean().item()
    return out.loss.item(), acc, hops


def train(cfg: TrainConfig, out_dir: Path, log_path: Path, minutes: float | None = None, eval_n: int = 500) -> dict:
    torch.set_num_threads(cfg.threads)
    run = start_run(cfg)
    model, processor = run.model, run.processor
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    log.write(json.dumps({"event": "config", **asdict(cfg), "params": sum(p.numel() for p in model.parameters())}) + "\n")
    t0 = time.time()
    loss_ema = acc_ema = None
    columns = (TextColumn("[bold]shiftbench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns) as progress:
        bar = progress.add_task("train", total=cfg.steps, info="")
        for step in range(cfg.steps):
            if minutes is not None and time.time() - t0 > 60 * minutes:
                log.write(json.dumps({"event": "time_limit", "step": step}) + "\n")
                break
            loss, acc, hops = train_step(run, step)
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            acc_ema = acc if acc_ema is None else 0.95 * acc_ema + 0.05 * acc
            record = {"step": step, "loss": round(loss, 4), "token_acc": round(acc, 4), "max_hops": hops, "lr": lr_at(step, cfg), "time_s": round(time.time() - t0, 1)}
            if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
                model.eval()
                with torch.no_grad():
                    record["probe"] = {
                        "lookup": evaluate(model, processor, "lookup", 50, PROBE_EVAL_SEED)["accuracy"],
                        "walk": evaluate(model, processor, "walk", 100, PROBE_EVAL_SEED)["by_hops"],
                    }
                model.train()
                progress.console.print(f"step {step + 1}: loss {loss_ema:.4f} token_acc {acc_ema:.4f} probe {record['probe']}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.update(bar, advance=1, info=f"loss {loss_ema:.3f} acc {acc_ema:.3f} hops<={hops}")
    train_s = time.time() - t0
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with torch.no_grad():
        metrics = final_metrics(model, processor, eval_n)
    record = {"event": "final", "seed": cfg.seed, "steps_done": step + 1, "train_seconds": round(train_s, 1), "eval_n": eval_n, "eval_seed": FINAL_EVAL_SEED, "metrics": metrics, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    log.write(json.dumps(record) + "\n")
    log.close()
    (out_dir / "training_record.json").write_text(json.dumps({"config": asdict(cfg), **record}, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    write_card(out_dir, model, processor)
    return record
