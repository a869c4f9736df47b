"""``python -m benchmarks``: the end-to-end benchmark harness (:mod:`benchmarks.bench`)."""

from benchmarks.bench import main

raise SystemExit(main())
