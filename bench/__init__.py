"""The benchmark harness (`make bench`): see bench/run.py.

Every timing here is of work actually done: the persistent scoring cache is off for every
process a bench starts (a repeated run would otherwise be served from it). `bench/battery.py`
measures the cache itself, in a folder of its own.
"""

import os

os.environ["SWAY_SCORE_CACHE"] = "off"
