"""Column names shared by stages: one place, so no stage spells another's columns by hand."""

from __future__ import annotations

MOL_ID = "mol_id"  # blake2b-64 hex of the canonical SMILES (lardo_ray.chem.standardise.mol_id_of)
INPUT_SMILES = "input_smiles"  # the text exactly as read
CANONICAL_SMILES = "smiles"  # RDKit canonical SMILES after standardisation
USER_ID = "input_id"  # the user's own id column, when configured
SOURCE_ROW = "source_row"  # "<chunk_id>:<row>" where the row came from in the input: traceable, sortable
DSM_ERROR = "dsm_error"  # per-row note of descriptors RDKit could not compute (NaN in their columns)
REJECT_REASON = "reason"  # rejected/ rows: a value of lardo_ray.chem.standardise.REASONS
REJECT_DETAIL = "detail"
STAGE = "stage"

# describe stage
DESCRIPTION = "description"
TEMPLATE_ID = "template_id"

# featurize stage (OGB scheme)
ATOM_FEATURES = "x"  # list<list<int64>> n_atoms x 9
EDGE_INDEX = "edge_index"  # list<list<int64>> 2 x n_edges (both directions)
EDGE_FEATURES = "edge_attr"  # list<list<int64>> n_edges x 3
NUM_NODES = "num_nodes"
DSM_TARGETS = "dsm_targets"  # list<float32>: the dsm stage's descriptors (NaN where missing), featurize.dsm_targets

# embed stage
TEXT_EMBEDDING = "text_embedding"  # list<float32>
