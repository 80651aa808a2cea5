"""`python -m patchlab.predict`: the same as `patchlab predict` (patchlab.deploy.predict)."""

from patchlab.deploy.predict import main

if __name__ == "__main__":
    main()
