"""difftrain: fine-tune and merge Stable-Diffusion-style models (the trainer wing).

Imported as ``difftrain``; the source folder is ``trainer/`` (see the README for why).
"""

__version__ = "0.1.0"
