import sys

from guided.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
