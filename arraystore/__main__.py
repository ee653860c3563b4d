"""``python -m arraystore`` is the ``arraystore`` command."""

from arraystore.cli import main

main()
