"""`python -m ares_operator`: the same as `kopf run --standalone -m ares_operator.handlers`."""

import sys

from kopf.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--standalone", "--all-namespaces", "-m", "ares_operator.handlers", *sys.argv[1:]]))
