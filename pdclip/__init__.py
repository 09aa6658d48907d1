"""pdclip: soft-target contrastive image-text training (CLIP, PSD, OTTER), built to be read.

Import-only: no side effects. See docs/architecture.md for the module map.
"""

__version__ = "0.1.0"
