"""LLM backends of the describe stage; see ``base`` for the interface and the registry."""

from lardo_ray.llm.backends.base import (  # noqa: F401
    DescribeRecord,
    Generation,
    LLMBackend,
    available_backends,
    create_backend,
    generate_fn,
    get_backend_class,
    register_backend,
)
