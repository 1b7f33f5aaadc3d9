"""``python -m shmrate``: the same as the ``shmrate`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
