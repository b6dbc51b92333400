"""``python -m registry`` runs the ``brickyard`` command line."""

from registry.cli.app import main

main()
