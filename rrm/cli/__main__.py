"""``python -m rrm.cli`` and ``torchrun -m rrm.cli``: the ``rrm`` command."""

from rrm.cli import main

main()
