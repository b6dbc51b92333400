"""``python -m registry`` runs the ``brickyard`` command line."""

from registry.cli import main

main()
