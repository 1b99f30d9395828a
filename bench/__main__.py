import sys

from bench.run import main

if __name__ == "__main__":  # a spawned peer re-imports the main module: run nothing then
    sys.exit(main())
