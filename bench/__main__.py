"""Entry point of `python -m bench`; each subcommand lives in its own module, imported on demand.

    python -m bench [options]          the main comparison (bench.run)
    python -m bench score ...          official SQuAD v1.1 / v2.0 scoring of a predictions file
    python -m bench decode ...         span-search decoder micro-benchmark
    python -m bench gpu ...            GPU check (device machine)
    python -m bench soak ...           long-run memory soak
    python -m bench load ...           closed-loop load: plain Engine vs BatchingEngine
    python -m bench footprint ...      file size and memory per precision
    python -m bench shapes ...         model cost per token by batch size and length
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose `main(argv: list[str]) -> int` runs it
SUBCOMMANDS = {
    "score": "bench.squad_eval",
    "decode": "bench.decode",
    "gpu": "bench.gpu",
    "soak": "bench.soak",
    "load": "bench.load",
    "footprint": "bench.footprint",
    "shapes": "bench.shapes",
}
DEFAULT = "bench.run"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module, rest = SUBCOMMANDS[argv[0]], argv[1:]
    else:
        module, rest = DEFAULT, argv
    return int(importlib.import_module(module).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
