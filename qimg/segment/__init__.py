"""Masks from words: segmentation models that turn (image, phrases) into per-pixel probabilities. models.py
finds a model by name, folder or Hugging Face repo id (no transformers needed); providers.py runs it through
transformers, the optional extra qimg[masks], and is the one qimg module that imports transformers."""
