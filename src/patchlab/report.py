"""`python -m patchlab.report`: the same as `patchlab report` (patchlab.reporting.report)."""

from patchlab.reporting.report import main

if __name__ == "__main__":
    main()
