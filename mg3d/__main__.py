"""``python -m mg3d`` runs the CLI."""

from mg3d.cli import main

main()
