"""Fine-tuning and evaluation on labelled molecule sets: dataset cards, splits, metrics, settings.

Light on import: submodules load pandas / RDKit / scikit-learn only when they are used.
"""
