"""`python -m patchlab.export`: the same as `patchlab export` (patchlab.deploy.export)."""

from patchlab.deploy.export import main

if __name__ == "__main__":
    main()
