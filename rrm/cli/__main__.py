"""``python -m rrm.cli`` and ``torchrun -m rrm.cli``: the ``rrm`` command."""

from rrm.console import main

main()
