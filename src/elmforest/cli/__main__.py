"""`python -m elmforest.cli`: the command line, as the `elmforest` script runs it."""

from elmforest.cli import main

main()
