"""The describe stage (MolGraph-LarDo stage 1 + 2) without Ray.

Light on import: submodules are imported where used (``settings`` needs only pydantic).
"""
