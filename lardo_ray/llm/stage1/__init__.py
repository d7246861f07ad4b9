"""Stage 1: the molecular description template of a task.

The LLM is asked once per task which properties relate to the endpoint (``prompts.stage1_messages``). Its
answer is parsed tolerantly (``parse_stage1_answer``), each property is calibrated to DSM calculators
(``calibrate``: synonym table, registry names, fuzzy matching; unmappable ones are dropped and reported),
and the result is a ``Template``: versioned JSON whose content hash is its ``template_id``.
``build_template`` wraps the whole thing with retries, a card-default fallback and a cache directory.

Modules, in the order the answer flows through them: ``template`` (the Template model), ``parse`` (the
tolerant parser), ``calibrate`` (the synonym table and the mapping to DSM calculators), ``build`` (ask,
retry, fall back, cache).
"""

from lardo_ray.llm.stage1.build import build_template, template_cache_path
from lardo_ray.llm.stage1.calibrate import (
    INVERTED,
    NOT_COMPUTABLE,
    SYNONYMS,
    calibrate,
    default_template,
    generic_template,
    is_inverted,
    label_for,
    map_property,
    normalise_threshold,
)
from lardo_ray.llm.stage1.parse import parse_stage1_answer
from lardo_ray.llm.stage1.template import (
    TEMPLATE_FORMAT,
    TEMPLATE_VERSION,
    DroppedClaim,
    Messages,
    PropertyClaim,
    Template,
    TemplateProperty,
)

__all__ = [
    "INVERTED", "NOT_COMPUTABLE", "SYNONYMS", "TEMPLATE_FORMAT", "TEMPLATE_VERSION", "DroppedClaim", "Messages",
    "PropertyClaim", "Template", "TemplateProperty", "build_template", "calibrate", "default_template",
    "generic_template", "is_inverted", "label_for", "map_property", "normalise_threshold", "parse_stage1_answer",
    "template_cache_path",
]
