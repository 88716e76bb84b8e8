"""The benchmark, runnable from a checkout: same as the `fsmnet-bench` console script.

  python scripts/bench.py --json bench.json
"""

from fsmnet_bench import run

if __name__ == '__main__':
  run()
