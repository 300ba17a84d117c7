#!/usr/bin/env python3
"""Submit / inspect / delete training jobs on Kubernetes; all logic lives in k8s/submit.py.

    python scripts/submit_k8s.py --backend tfjob --workers 2 --image IMG \
        --data pvc://mlt-data --model-dir pvc://mlt-model/run1 --dry-run
"""
import os
import sys

# Run from a checkout without installing: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k8s.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
