"""`ray job submit ... -- python jobs/dsm.py --config configs/demo.yaml`: the DSM stage as a Ray job."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lardo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dsm", *sys.argv[1:]]))
