#!/usr/bin/env python3
"""One-off measurement behind docs/benchmarks.md (the poll path's per-poll cost): ``timeit`` of
the plan decoder's general path (best of 7 × 2000 calls, µs per poll) for two maps that are not
plain 16-bit: ``mixed`` (``poll_path_micro.mixed_map``: int16, scaled uint16, float32 in each
word order; one request) and the ``cnc-sim`` profile (uint32, float32, ...; two requests).

Run once per tree, alternating (``PYTHONPATH`` picks the tree; run from outside the worktree)::

    cd /tmp && PYTHONPATH=/path/to/tree /path/to/.venv/bin/python \\
        /path/to/benchmarks/results/2026-11-30-vm-poll/decoder_general_micro.py
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from poll_path_micro import mixed_map  # noqa: E402

from drivers.modbus.plan import Decoder, plan_reads  # noqa: E402
from drivers.modbus.registers import load_profile  # noqa: E402


def main() -> None:
    regs, block = mixed_map()
    requests = plan_reads(regs)
    mixed = Decoder(regs, requests)
    blocks = [block[: r.count] for r in requests]
    cnc = load_profile("cnc-sim")
    cnc_requests = plan_reads(cnc)
    cnc_decoder = Decoder(cnc, cnc_requests)
    cnc_blocks = [np.frombuffer(bytes(2 * r.count), ">u2") for r in cnc_requests]

    def best_us(fn: object) -> float:
        return min(timeit.repeat(fn, number=2000, repeat=7)) / 2000 * 1e6  # type: ignore[arg-type]

    tree = os.environ.get("PYTHONPATH", "(installed tree)")
    print(
        f"{tree:24} mixed {best_us(lambda: mixed.decode(blocks)):6.2f} us  "
        f"cnc-sim {best_us(lambda: cnc_decoder.decode(cnc_blocks)):6.2f} us  "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
