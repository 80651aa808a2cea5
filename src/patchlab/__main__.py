"""`python -m patchlab <command>`: the same as the `patchlab` console script."""

from patchlab.cli import main

main()
