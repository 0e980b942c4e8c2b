"""``python -m vitquant.cli``: the ``vitquant`` command line."""

from __future__ import annotations

from vitquant.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
