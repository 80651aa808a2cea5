"""`python -m patchlab.predict`: see patchlab.deploy.predict."""

from patchlab.deploy.predict import main

if __name__ == "__main__":
    main()
