"""`python -m ablate` runs the CLI."""

from ablate.cli import main

main()
