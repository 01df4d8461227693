"""The `dstp` command line: `main.py` assembles the parser from one module per subcommand (`bench`, `generate`,
`analyze`, `speed`, `fidelity`, `shiftbench`); `common.py` is what they share (the one-line parser, the list types,
the run-and-report pattern). `train`, `card` and `revival_check` are the mains of `dstp shiftbench train`,
`python -m dstp.lab.cli.card` and `python -m dstp.lab.cli.revival_check`, built the same way."""
