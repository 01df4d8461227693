"""The lab: the research tooling built on the dstp library (`dstp.load`, the engine, the pruners, DSTP, RVIS).

- `dstp.lab.shiftbench`: the ShiftBench testbed (tasks, renderer, processor, model and its adapter, training, model
  card, lmms-eval export, the shipped checkpoint);
- `dstp.lab.bench`: the benchmark sweeps (`dstp bench`), ablation, plots, engine fidelity, speed and memory;
- `dstp.lab.cli`: the `dstp` command line, one module per subcommand.

Nothing in the library imports the lab (tests/test_layering.py checks it).
"""
