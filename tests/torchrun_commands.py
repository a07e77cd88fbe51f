"""Several `brainfusion` command lines one after another in each torchrun worker: `torchrun ... torchrun_commands.py
'<json list of argv lists>'`. One launch spares the second start of torchrun and of both workers' imports (~8 s on
two busy cores), and runs what `brainfusion demo` does under torchrun: a process group set up, torn down and set up
again in the same worker."""

from __future__ import annotations

import json
import sys

from brainfusion.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        status = main(argv)
        if status != 0:
            sys.exit(status)
