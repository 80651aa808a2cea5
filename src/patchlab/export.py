"""`python -m patchlab.export`: see patchlab.deploy.export."""

from patchlab.deploy.export import main

if __name__ == "__main__":
    main()
