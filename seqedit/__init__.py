"""seqedit: sequential model-editing stress tests and forgetting analysis.

Importing this package is cheap: heavy modules (torch models, lm-eval, wandb) load on use.
"""
__version__ = "0.1.0"
