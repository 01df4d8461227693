"""The report of a `dstp speed` result: its rows against issue 16's targets, and the tables printed."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def targets(rows: list[dict]) -> list[dict]:
    """The targets of issue 24 (engine v2) as ratios in one run. Every scenario: the engine >= 1.0x generate()'s
    compiled static cache (tokens/s, compiled engine). overhead-bound: the compiled step >= 2x the eager one.
    weight-bound (and `real`, the batch-1 model weight-bound stands in for): compiled no slower than eager; DSTP
    store >= 0.95x and recompute >= 0.90x FastV, compiled. kv-bound: DSTP store within 1.15x and recompute within 2x
    of the byte-proportional ideal for their active sets, and both faster than the unpruned engine (compiled)."""
    by = {(r["scenario"], r["name"]): r for r in rows}
    out = []

    def add(scenario, what, value, target, higher_is_better=True):
        out.append(dict(scenario=scenario, what=what, value=value, target=target,
                        met=value >= target if higher_is_better else value <= target))

    for scenario in sorted({r["scenario"] for r in rows}):
        tps = lambda name: by[(scenario, name)]["tokens_per_s"]  # noqa: E731
        ratio = lambda a, b, target: add(scenario, f"{a} / {b} tokens/s", tps(a) / tps(b), target)  # noqa: E731
        ratio("engine_unpruned_compiled", "hf_generate_static", 1.0)
        if scenario == "overhead-bound":
            ratio("engine_unpruned_compiled", "engine_unpruned", 2.0)
        elif scenario in ("weight-bound", "real"):
            ratio("engine_unpruned_compiled", "engine_unpruned", 1.0)
            ratio("fastv_dstp_store_compiled", "fastv_compiled", 0.95)
            ratio("fastv_dstp_recompute_compiled", "fastv_compiled", 0.90)
        else:
            for name, bound in (("fastv_dstp_store_compiled", 1.15), ("fastv_dstp_recompute_compiled", 2.0)):
                add(scenario, f"{name} decode / ideal", by[(scenario, name)]["ratio_to_ideal"], bound, False)
                ratio(name, "engine_unpruned_compiled", 1.0)
    return out


def print_speed(result: dict, console: Console | None = None):
    console = console or Console(width=160)
    mib = lambda x: "-" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for scenario, c in result["scenarios"].items():
        model = "" if not c.get("model_config") else \
            f"{c['architecture']} from {c['model_config']}, random weights, image {c['image']}, "
        visual = c.get("visual_tokens") or c["grid"] ** 2
        table = Table(title=f"dstp speed {scenario}: {model}{result['device']}, {result['dtype']}, batch "
                            f"{c['batch']}, {visual} visual tokens, {c['layers']} layers x {c['hidden']}, "
                            f"{c['new_tokens']} new tokens, shift every {c['shift_every']}, median of {c['repeats']}")
        for col in ("row", "tokens/s", "prefill s", "decode ms/tok", "peak MiB measured", "peak MiB reported",
                    "vis tok/step", "decode/ideal", "prefill/ideal", "syncs/step (in DSTP)"):
            table.add_column(col, justify="right")
        for r in result["rows"]:
            if r["scenario"] != scenario:
                continue
            syncs = "-" if "loop_syncs_per_step" not in r else \
                f"{r['loop_syncs_per_step']:.2f} ({fmt(r.get('dstp_syncs_per_step'))})"
            label = r["name"] + (" (compiled)" if r.get("compiled") and r["name"] == "hf_generate_static" else "")
            table.add_row(label, f"{r['tokens_per_s']:.1f}", f"{r['prefill_s']:.3f}",
                          f"{r['decode_ms_per_token']:.2f}", mib(r["peak_bytes_measured"]),
                          mib(r["peak_bytes_reported"]),
                          fmt(r.get("visual_tokens_per_step")), fmt(r["ratio_to_ideal"]),
                          fmt(r["prefill_ratio_to_ideal"]), syncs)
        console.print(table)
    table = Table(title="targets (issue 24)")
    for col in ("scenario", "ratio", "value", "target", "met"):
        table.add_column(col)
    for t in result["targets"]:
        sign = ">=" if "tokens/s" in t["what"] else "<="
        table.add_row(t["scenario"], t["what"], f"{t['value']:.2f}", f"{sign} {t['target']:.2f}",
                      "yes" if t["met"] else "NO")
    console.print(table)
