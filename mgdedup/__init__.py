"""mgdedup: copies, near-duplicates and classes of images from one MultiGrain embedding."""

__version__ = "0.1.0"
