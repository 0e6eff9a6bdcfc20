import sys
from pathlib import Path

# The tests import their helpers (chartlib, podsecurity, kubelocal) from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
