"""``python -m autotune`` is ``autotune``."""

from autotune.cli import main

raise SystemExit(main())
