# The notebooks run as tests (nbval) in quick mode: each picks the `tiny` preset and finishes in
# well under a minute. The kernel inherits this process's environment.
import os

os.environ["MINISD_QUICK"] = "1"
collect_ignore = ["regenerate.py"]
