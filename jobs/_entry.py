"""Shared by the job scripts: `ray job submit --working-dir . -- python jobs/<stage>.py [flags]`.

A job script is the CLI subcommand of its file's name, so a job and `lardo-ray <stage>` never differ;
tests/test_jobs.py checks there is one per registered stage (lardo_ray.stages.registry). The working
directory Ray ships is put on sys.path, so the job needs no pip install on the cluster beyond the
dependencies.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(stage: str | None = None) -> None:
    from lardo_ray.cli import main

    stage = stage or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    sys.exit(main([stage, *sys.argv[1:]]))
