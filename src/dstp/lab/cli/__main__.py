"""`python -m dstp.lab.cli ...`: the `dstp` command without its console script."""
import sys

from dstp.lab.cli.main import main

sys.exit(main())
