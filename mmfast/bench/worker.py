"""`python -m mmfast.bench.worker SPEC_JSON`: measure one variant in this process, print the result.

Started by harness.run_worker, one process per variant; the result is the last line of stdout.
"""

import json
import sys

from .harness import worker_main

if __name__ == "__main__":
    print(json.dumps(worker_main(json.loads(sys.argv[1]))), flush=True)
