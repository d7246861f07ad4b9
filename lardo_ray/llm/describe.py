"""Stage 2 of the describe stage, without Ray: DSM rows in, one description per molecule out.

``DescribeStage2(cfg, template, backend)(batch)`` takes a pyarrow Table of DSM-stage rows (``mol_id``,
``smiles`` and descriptor columns; descriptors the prompt or the post-check need but the batch lacks are
computed on the fly) and returns one row per input row with the columns of ``OUTPUT_SCHEMA`` plus the
input's non-descriptor columns (labels, ``input_smiles``, ...). Failed rows are kept, with ``error`` set and
a null ``description``. The Ray wrapper builds one instance per actor (the backend is loaded once).

For engines that generate outside this class (e.g. a Ray Data vLLM processor), split the call:
``prepared = stage.prepare(batch)``, generate ``prepared.llm_requests()``, then
``stage.finish(batch, prepared, {row: Generation})``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from lardo_ray.chem.descriptors import DescriptorCalculator, registry
from lardo_ray.llm.backends.base import DescribeRecord, Generation, LLMBackend, Messages, create_backend
from lardo_ray.llm.backends.rules import RulesBackend
from lardo_ray.llm.postcheck import CHECKABLE, PostcheckResult, check, correct, corrections
from lardo_ray.llm.prompts import PROMPT_VERSION, PromptBuilder
from lardo_ray.llm.settings import DescribeConfig
from lardo_ray.llm.stage1 import Template, generic_template
from lardo_ray.schema import CANONICAL_SMILES, DESCRIPTION, MOL_ID, TEMPLATE_ID

USE_LLM = "use_llm"  # optional bool input column: False routes the row to the rules backend (llm_slice)

OUTPUT_SCHEMA = pa.schema([
    (MOL_ID, pa.string()),
    (CANONICAL_SMILES, pa.string()),
    (DESCRIPTION, pa.string()),
    (TEMPLATE_ID, pa.string()),
    ("backend", pa.string()),
    ("model", pa.string()),
    ("sampling_params", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_s", pa.float64()),
    ("n_claims", pa.int64()),
    ("n_wrong", pa.int64()),
    ("n_claims_before", pa.int64()),
    ("n_wrong_before", pa.int64()),
    ("n_regenerations", pa.int64()),
    ("n_corrected", pa.int64()),
    ("n_undecidable_before", pa.int64()),
    ("claims_by_kind", pa.string()),
    ("wrong_claims", pa.string()),
    ("error", pa.string()),
    ("cache_key", pa.string()),
])
OUTPUT_COLUMNS = OUTPUT_SCHEMA.names


def cache_key(smiles: str, template_id: str, model: str, sampling_json: str, *extra: str) -> str:
    """Identity of one description: same inputs -> same key on every node and run."""
    payload = json.dumps([smiles, template_id, model, sampling_json, *extra], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def resolve_template(
    cfg: DescribeConfig,
    backend: LLMBackend | None = None,
    generate: Callable[[Messages], str] | None = None,
) -> Template:
    """The stage-1 template a run uses, in order of precedence:

    ``cfg.template_path`` (a saved template) > the ``no_stage1`` variant (generic template) > the rules
    backend or no LLM given (the card's default properties) > stage 1 with ``generate`` (a one-prompt text
    function, e.g. an endpoint call from the driver) or ``backend`` (``generate_fn(backend, ...)``), cached in
    ``cfg.template_cache_dir``.
    """
    from lardo_ray.llm.backends.base import generate_fn
    from lardo_ray.llm.cards import load_card
    from lardo_ray.llm.stage1 import build_template, default_template

    if cfg.template_path:
        return Template.load(cfg.template_path)
    if cfg.variant == "no_stage1":
        return generic_template(cfg.prompt_set)
    card = load_card(cfg.task)
    if generate is None and (backend is None or isinstance(backend, RulesBackend)):
        return default_template(card, cfg.prompt_set, reason="no LLM for stage 1 (rules backend)")
    fn = generate or generate_fn(backend, cfg.sampling.for_stage(1))
    return build_template(card, fn, cfg.prompt_set, cfg.stage1_retries, model=cfg.model_name,
                          cache_dir=cfg.template_cache_dir)


@dataclass
class Prepared:
    """Per-row inputs of one batch: records (None = the row already failed), values, routing."""

    records: list[DescribeRecord | None]
    values: list[dict[str, float]]
    errors: list[str | None]
    use_llm: list[bool]
    extra: dict = field(default_factory=dict)

    def llm_requests(self) -> list[tuple[int, Messages]]:
        return [(i, r.messages) for i, r in enumerate(self.records) if r is not None and self.use_llm[i]]


@dataclass
class RowOutcome:
    """What one row ends with: its text, why it has none, its token counts and latency (regenerations
    added), and the post-check as the LLM wrote it (``before``) and after any correction (``after``)."""

    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    before: PostcheckResult | None = None
    after: PostcheckResult | None = None
    regenerations: int = 0
    corrected: int = 0


class DescribeStage2:
    def __init__(self, cfg: DescribeConfig, template: Template | None, backend: LLMBackend | None = None):
        self.cfg = cfg
        if cfg.variant == "no_stage1":
            template = generic_template(cfg.prompt_set)
        elif template is None:
            raise ValueError("DescribeStage2 needs a template (stage 1) unless variant == 'no_stage1'")
        self.template = template
        self.backend = backend if backend is not None else create_backend(cfg)
        self.rules = self.backend if isinstance(self.backend, RulesBackend) else RulesBackend.from_config(cfg)
        self.builder = PromptBuilder(cfg.prompt_set, cfg.variant, template)
        self.sampling = cfg.sampling.for_stage(2)
        reg = registry()
        writer: list[str] = []
        for name in [*self.builder.descriptors, *template.descriptors()]:
            if name in reg and name not in writer:
                writer.append(name)
        # What the writers need; the post-check of LLM text needs every checkable descriptor besides, since
        # an LLM may state any of them. Rules-only batches skip those (most of the cost at bulk scale).
        self.needed_rules = writer
        self.needed = writer + [n for n in CHECKABLE if n in reg and n not in writer]
        self._llm_rows_used = 0  # llm_slice bookkeeping for batches without a use_llm column
        self._calculators: dict[tuple[str, ...], DescriptorCalculator] = {}

    # ---------------------------------------------------------------------------------------- inputs
    def _values(self, batch: pa.Table, smiles: list[str | None], needed: list[str]
                ) -> tuple[list[dict[str, float]], list[str | None]]:
        n = batch.num_rows
        cols: dict[str, np.ndarray] = {}
        missing = []
        for name in needed:
            if name in batch.column_names:
                # nulls become NaN: "the DSM could not compute it", never a claim to check against
                cols[name] = batch.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(float)
            else:
                missing.append(name)
        errors: list[str | None] = [None] * n
        if missing:
            from rdkit import Chem

            mols, idx = [], []
            for i, s in enumerate(smiles):
                mol = Chem.MolFromSmiles(s) if s else None
                if mol is None:
                    errors[i] = f"invalid SMILES: {s!r}"[:200]
                else:
                    mols.append(mol)
                    idx.append(i)
            key = tuple(missing)
            calc = self._calculators.get(key) or self._calculators.setdefault(key, DescriptorCalculator(missing))
            vals, _ = calc.compute(mols)
            for j, name in enumerate(missing):
                col = np.full(n, np.nan)
                col[idx] = vals[:, j]
                cols[name] = col
        out = [{name: float(cols[name][i]) for name in needed} for i in range(n)]
        return out, errors

    def _route(self, batch: pa.Table) -> list[bool]:
        n = batch.num_rows
        if isinstance(self.backend, RulesBackend):
            return [False] * n
        if USE_LLM in batch.column_names:
            return [bool(v) if v is not None else False for v in batch.column(USE_LLM).to_pylist()]
        if self.cfg.llm_slice is None:
            return [True] * n
        left = max(self.cfg.llm_slice - self._llm_rows_used, 0)
        take = min(left, n)
        self._llm_rows_used += take
        return [i < take for i in range(n)]

    def prepare(self, batch: pa.Table) -> Prepared:
        n = batch.num_rows
        if CANONICAL_SMILES not in batch.column_names:
            raise KeyError(f"describe input needs a {CANONICAL_SMILES!r} column; got {batch.column_names}")
        smiles = batch.column(CANONICAL_SMILES).to_pylist()
        if MOL_ID in batch.column_names:
            ids = batch.column(MOL_ID).to_pylist()
        else:
            from lardo_ray.chem.standardise import mol_id_of

            ids = [mol_id_of(s) if s else None for s in smiles]
        use_llm = self._route(batch)
        values, errors = self._values(batch, smiles, self.needed if any(use_llm) else self.needed_rules)
        records: list[DescribeRecord | None] = []
        for i in range(n):
            if errors[i] is not None or not smiles[i]:
                errors[i] = errors[i] or "missing SMILES"
                records.append(None)
                continue
            try:
                msgs = self.builder.stage2(smiles[i], values[i])
            except Exception as e:  # noqa: BLE001
                errors[i] = f"prompt failed: {type(e).__name__}: {e}"
                records.append(None)
                continue
            records.append(DescribeRecord(
                smiles=smiles[i], messages=msgs, values=values[i], template=self.template,
                prompt_descriptors=self.builder.descriptors, mol_id=ids[i], prompt_set=self.cfg.prompt_set,
                variant=self.cfg.variant,
            ))
        return Prepared(records, values, errors, use_llm, {"ids": ids, "smiles": smiles})

    # ---------------------------------------------------------------------------------------- run
    def __call__(self, batch: pa.Table) -> pa.Table:
        prepared = self.prepare(batch)
        gens: dict[int, Generation] = {}
        llm_rows = [i for i, r in enumerate(prepared.records) if r is not None and prepared.use_llm[i]]
        rule_rows = [i for i, r in enumerate(prepared.records) if r is not None and not prepared.use_llm[i]]
        if llm_rows:
            out = self._safe_describe(self.backend, [prepared.records[i] for i in llm_rows])
            gens.update(zip(llm_rows, out))
        if rule_rows:
            out = self._safe_describe(self.rules, [prepared.records[i] for i in rule_rows])
            gens.update(zip(rule_rows, out))
        return self.finish(batch, prepared, gens)

    def _safe_describe(self, backend: LLMBackend, records: list[DescribeRecord], seed_offset: int = 0):
        sampling = self.sampling
        if seed_offset and sampling.seed is not None:
            sampling = sampling.with_seed(sampling.seed + seed_offset)
        try:
            out = backend.describe_batch(records, sampling)
            if len(out) != len(records):
                raise RuntimeError(f"backend returned {len(out)} generations for {len(records)} prompts")
            return out
        except Exception as e:  # noqa: BLE001 - a backend crash fails these rows, not the job
            return [Generation.failed(f"backend error: {type(e).__name__}: {str(e)[:300]}") for _ in records]

    # ---------------------------------------------------------------------------------------- post
    def _check(self, text: str | None, values: dict[str, float], smiles: str | None = None) -> PostcheckResult:
        return check(text, values, self.cfg.rel_tolerance, self.cfg.abs_tolerance, smiles=smiles)

    def finish(self, batch: pa.Table, prepared: Prepared, gens: dict[int, Generation]) -> pa.Table:
        cfg, n = self.cfg, batch.num_rows
        mode = cfg.postcheck
        rows = [RowOutcome(error=prepared.errors[i]) for i in range(n)]
        for i, row in enumerate(rows):
            g = gens.get(i)
            if prepared.records[i] is None:
                continue
            if g is None:
                row.error = row.error or "not generated"
                continue
            row.text, row.prompt_tokens, row.completion_tokens = g.text, g.prompt_tokens, g.completion_tokens
            row.latency_s = g.latency_s
            if g.error is not None or g.text is None:
                row.error, row.text = g.error or "empty generation", None

        if mode != "off":
            for i, row in enumerate(rows):
                if row.text is None:
                    continue
                if prepared.use_llm[i] or self.rules.structure:  # structure lines: checked as an LLM's are
                    row.before = self._check(row.text, prepared.values[i], prepared.extra["smiles"][i])
                else:  # the rules writer states DSM values only: count them instead of re-parsing its text
                    row.before = PostcheckResult(self.rules.stated(prepared.records[i]), 0)
        current = [row.before for row in rows]  # the post-check of each row's text as it stands

        if mode == "regenerate" and not isinstance(self.backend, RulesBackend):
            for attempt in range(1, cfg.max_regenerations + 1):
                redo = [i for i in range(n) if current[i] is not None and current[i].n_wrong > 0 and prepared.use_llm[i]]
                if not redo:
                    break
                out = self._safe_describe(self.backend, [prepared.records[i] for i in redo], seed_offset=attempt)
                for i, g in zip(redo, out):
                    row = rows[i]
                    row.regenerations += 1
                    row.prompt_tokens += g.prompt_tokens
                    row.completion_tokens += g.completion_tokens
                    row.latency_s += g.latency_s
                    if g.error is None and g.text:
                        res = self._check(g.text, prepared.values[i], prepared.extra["smiles"][i])
                        if res.n_wrong < current[i].n_wrong:
                            current[i], row.text = res, g.text

        for i, row in enumerate(rows):
            if row.text is None or mode == "off":
                continue
            res = current[i]
            if mode in ("correct", "regenerate") and res.n_wrong and prepared.use_llm[i]:
                smiles = prepared.extra["smiles"][i]
                fixes = corrections(res)
                if fixes:
                    row.text = correct(row.text, prepared.values[i], cfg.rel_tolerance, cfg.abs_tolerance,
                                       smiles=smiles)
                    row.corrected = len(fixes)
                    res = self._check(row.text, prepared.values[i], smiles)
            row.after = res

        return self._table(batch, prepared, rows)

    def _table(self, batch: pa.Table, prepared: Prepared, rows: list[RowOutcome]) -> pa.Table:
        n = batch.num_rows
        cfg = self.cfg
        llm_sampling = self.sampling.key()
        tid = self.template.template_id
        backend_col, model_col, samp_col, keys, wrong_json, kinds_json = [], [], [], [], [], []
        extra = [cfg.prompt_set, cfg.variant, cfg.postcheck, str(PROMPT_VERSION)]
        for i, row in enumerate(rows):
            b = self.backend if prepared.use_llm[i] else self.rules
            samp = llm_sampling if b.uses_sampling else "{}"
            backend_col.append(b.name)
            model_col.append(b.model)
            samp_col.append(samp)
            s = prepared.extra["smiles"][i]
            keys.append(cache_key(s, tid, b.model, samp, b.name, *extra) if s else None)
            before = row.before
            wrong_json.append(json.dumps(before.wrong_dicts(), default=str) if before is not None else None)
            kinds_json.append(json.dumps(before.by_kind()) if before is not None and before.details
                              + before.structural else None)
        before = [row.before for row in rows]
        after = [row.after for row in rows]
        lat = [row.latency_s for row in rows]

        def ints(results, attr):
            return [getattr(r, attr) if r is not None else None for r in results]

        cols = {
            MOL_ID: prepared.extra["ids"],
            CANONICAL_SMILES: prepared.extra["smiles"],
            DESCRIPTION: [row.text for row in rows],
            TEMPLATE_ID: [tid] * n,
            "backend": backend_col,
            "model": model_col,
            "sampling_params": samp_col,
            "prompt_tokens": [row.prompt_tokens for row in rows],
            "completion_tokens": [row.completion_tokens for row in rows],
            "latency_s": [float(x) if x is not None and not math.isnan(x) else None for x in lat],
            "n_claims": ints(after, "n_claims"),
            "n_wrong": ints(after, "n_wrong"),
            "n_claims_before": ints(before, "n_claims"),
            "n_wrong_before": ints(before, "n_wrong"),
            "n_regenerations": [row.regenerations for row in rows],
            "n_corrected": [row.corrected for row in rows],
            "n_undecidable_before": [r.n_undecidable if r is not None else None for r in before],
            "claims_by_kind": kinds_json,
            "wrong_claims": wrong_json,
            "error": [row.error for row in rows],
            "cache_key": keys,
        }
        arrays = [pa.array(cols[f.name], type=f.type) for f in OUTPUT_SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
        if cfg.carry_input_columns:
            reg = registry()
            skip = set(OUTPUT_COLUMNS) | {USE_LLM}
            for name in batch.column_names:
                if name not in skip and name not in reg:
                    table = table.append_column(batch.schema.field(name), batch.column(name))
        return table
