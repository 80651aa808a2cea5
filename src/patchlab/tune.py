"""`python -m patchlab.tune RUN_ID`: kept as an alias of patchlab.tuning.retune."""

from patchlab.tuning.retune import main

if __name__ == "__main__":
    main()
