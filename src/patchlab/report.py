"""`python -m patchlab.report`: kept as an alias of patchlab.reporting.report."""

from patchlab.reporting.report import main

if __name__ == "__main__":
    main()
