"""`python -m patchlab.render`: the same as `patchlab render` (patchlab.reporting.render)."""

from patchlab.reporting.render import main

if __name__ == "__main__":
    main()
