"""Integrations of dstp with other tools. Nothing in dstp imports them; each imports its tool only inside its
own module, so `import dstp` works whether or not the tool is installed.

- `dstp.integrations.lmms_eval`: the lmms-eval model `dstp` (install with `pip install "dstp[eval]"`).
"""
