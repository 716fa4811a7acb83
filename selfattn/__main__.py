"""``python -m selfattn``: a worked self-attention example and one speed line (see selfattn/_demo.py)."""

import sys

from selfattn._demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
