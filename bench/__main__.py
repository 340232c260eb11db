"""``python -m bench``: run the benchmark harness (see bench/README.md)."""

from bench.runner import main

raise SystemExit(main())
