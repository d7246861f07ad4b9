"""lardo_ray: MolGraph-LarDo on Ray. The package follows the data flow (dsm -> describe -> embed -> featurize ->
pretrain -> finetune -> compare, then predict / encode / serve):

- ``stages/``    a module per stage (core + hooks); ``registry`` lists them, ``lifecycle`` runs any chunked one
- ``stages/vllm/`` the ``ray.data.llm`` describe pipeline (the only LLM code that touches Ray)
- ``chem/``      RDKit: standardiser, DSM descriptors, molecular graphs
- ``llm/``       LLM backends, prompts, stage-1 templates, the post-check (no Ray)
- ``models/``    every nn.Module; saved models and their MLflow flavour
- ``train/``     the plain contrastive loop and the Ray Train + DeepSpeed driver
- ``finetune/``  datasets, splits, metrics, bootstrap, baselines, the fine-tuning loop
- ``config.py`` (YAML + --set, validated), ``cli.py``, ``io.py``/``fs.py`` (chunks, atomic outputs, S3),
  ``tracking.py`` (MLflow), ``serve.py`` (Ray Serve)
"""
