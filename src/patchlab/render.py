"""`python -m patchlab.render RUN_DIR`: kept as an alias of patchlab.reporting.render."""

from patchlab.reporting.render import main

if __name__ == "__main__":
    main()
