"""``python -m bench``: shmrate against what users would pick instead."""

from __future__ import annotations

from bench.cli import main

raise SystemExit(main())
