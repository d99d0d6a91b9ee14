"""elmforest: Branch-Train-Merge language models."""
__version__ = "0.1.0"
