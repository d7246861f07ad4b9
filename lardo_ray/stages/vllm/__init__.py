"""The ``vllm`` describe backend on Ray: everything that touches ``ray.data.llm`` lives here, on the Ray side.

- ``processor``: stage 2 as one streaming Ray Data pipeline around ``ray.data.llm``'s vLLM engine actor pool
  (prepare -> engine -> finish), usable on any Ray Dataset (``describe_dataset_vllm``).
- ``waves``: how the describe stage feeds that pipeline with its shards, in waves, keeping the one-shard-per-
  chunk output, the markers and the stall watchdog of every other stage (``run_vllm_waves``).

``lardo_ray.llm`` stays free of Ray: its in-process ``VLLMBackend`` (``llm/backends/vllm.py``) shares the
engine settings and prompt rendering that the processor uses.
"""

from lardo_ray.stages.vllm.processor import describe_dataset_vllm
from lardo_ray.stages.vllm.waves import run_vllm_waves

__all__ = ["describe_dataset_vllm", "run_vllm_waves"]
