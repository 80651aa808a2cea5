"""`python -m patchlab.tune`: the same as `patchlab tune` (patchlab.jobs.retune)."""

from patchlab.jobs.retune import main

if __name__ == "__main__":
    main()
